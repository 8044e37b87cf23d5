"""The GPU comparison's workload, shared by bench_engine.py and bench_faster_qwen3_tts.py so that every
engine speaks the same text with the same voices for the same number of frames. No imports: the
faster-qwen3-tts script runs in an environment without this project's dependencies."""

FRAME_RATE = 12.5  # codec frames per second of audio
TEXT = (
    "The east wing of the gallery opens at nine. Please keep to the marked paths, and ask any guide if you "
    "would like to hear more about the paintings, the sculptures or the history of the house itself."
)
VOICES = [("ryan", "english"), ("vivian", "chinese"), ("sohee", "korean"), ("aiden", "auto")]
