"""Development and test tools: the tiny random-weight checkpoint (TTS_MODEL=tiny)."""
