"""Encoding of model waveforms into the bytes clients receive."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM mono WAV: the one format every client (Unity, browsers, curl | aplay) plays."""
    mono = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    buffer = io.BytesIO()
    sf.write(buffer, mono, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
