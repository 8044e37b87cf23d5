"""Audio clips for the voice tests: good reference clips in every upload format, and hostile uploads
with the message each must be refused with."""

from __future__ import annotations

import io

import av
import numpy as np
import soundfile as sf


def tone(seconds: float, rate: int = 24_000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    return mono if channels == 1 else np.repeat(mono[:, None], channels, axis=1)


def soundfile_bytes(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def pyav_bytes(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as muxer:
        stream = muxer.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            muxer.mux(packet)
        for packet in stream.encode(None):
            muxer.mux(packet)
    return out.getvalue()


GOOD = {
    "wav 16-bit 24 kHz mono": lambda: soundfile_bytes(tone(3), 24_000, "WAV", "PCM_16"),
    "wav stereo 44.1 kHz": lambda: soundfile_bytes(tone(3, 44_100, 2), 44_100, "WAV", "PCM_16"),
    "flac 16 kHz": lambda: soundfile_bytes(tone(2, 16_000), 16_000, "FLAC"),
    "ogg vorbis 48 kHz": lambda: soundfile_bytes(tone(2, 48_000), 48_000, "OGG", "VORBIS"),
    "mp3 44.1 kHz": lambda: pyav_bytes(tone(2, 44_100), 44_100, "mp3", "libmp3lame"),
    "m4a aac 48 kHz": lambda: pyav_bytes(tone(2, 48_000), 48_000, "ipod", "aac"),
}


def nan_wav() -> bytes:
    samples = tone(2)
    samples[1000:1100] = np.nan
    return soundfile_bytes(samples, 24_000, "WAV", "FLOAT")


HOSTILE = {
    "empty": (lambda: b"", "empty"),
    "one byte": (lambda: b"R", "not a readable audio file"),
    "text named .wav": (lambda: b"this is not audio, just text pretending to be a WAV file\n" * 20, "not a readable"),
    "0.2 s": (lambda: soundfile_bytes(tone(0.2), 24_000, "WAV", "PCM_16"), "got 0.20 s"),
    "5 minutes": (lambda: soundfile_bytes(tone(300, 8_000), 8_000, "WAV", "PCM_16"), "got more"),
    "NaN samples": (nan_wav, "NaN"),
    "8 channels": (lambda: soundfile_bytes(tone(2, 24_000, 8), 24_000, "WAV", "PCM_16"), "got 8 channels"),
    "192 kHz": (lambda: soundfile_bytes(tone(2, 192_000), 192_000, "WAV", "PCM_16"), "got 192000 Hz"),
    "silence": (lambda: soundfile_bytes(np.zeros(48_000, np.float32), 24_000, "WAV", "PCM_16"), "silent"),
    "truncated wav": (lambda: soundfile_bytes(tone(3), 24_000, "WAV", "PCM_16")[:60], "s long"),
}
