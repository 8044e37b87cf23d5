"""Facts of Qwen3-TTS's 12 Hz speech tokenizer that code needs before a model is loaded."""

FRAME_RATE_HZ = 12.5  # codec frames per second: one talker step and 16 codes per 80 ms of audio
