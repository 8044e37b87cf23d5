"""Reference audio for a cloned voice: an upload, decoded and checked before any model sees it.

Decoded with PyAV (FFmpeg), which reads WAV, FLAC, MP3, OGG/Opus/Vorbis and M4A/AAC alike, in a worker
thread with a timeout, and never past the longest clip allowed: a 5-minute upload costs 30 s of
decoding, not 5 minutes. The result is mono float32 at the model's rate (24 kHz), as qwen-tts expects.
Every refusal is a ReferenceAudioError naming the form field, which the route answers as a 400.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

import numpy as np

MIN_SECONDS, MAX_SECONDS = 1.0, 30.0
MIN_RATE, MAX_RATE = 8_000, 48_000
MAX_CHANNELS = 2
SILENCE_PEAK = 1e-3  # below this the clip holds no voice to clone
DECODE_TIMEOUT_S = 20.0
FORMATS = "WAV, FLAC, MP3, OGG or M4A"


class ReferenceAudioError(ValueError):
    """The upload is not usable reference audio; `field` is the form field to name."""

    def __init__(self, message: str, field: str = "audio") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ReferenceAudio:
    samples: np.ndarray  # float32 mono at `sample_rate`
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def decode_reference(data: bytes, sample_rate: int = 24_000) -> ReferenceAudio:
    """Decode and check one upload (blocking; see `decode_reference_async`)."""
    import av  # FFmpeg's bindings load with the first upload, not with the service (as for `audio.encode`)

    if not data:
        raise ReferenceAudioError("the file is empty")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise ReferenceAudioError(f"not a readable audio file ({FORMATS} expected)") from exc
    with container:
        if not container.streams.audio:
            raise ReferenceAudioError(f"the file holds no audio stream ({FORMATS} expected)")
        stream = container.streams.audio[0]
        channels, rate = stream.codec_context.channels, stream.codec_context.sample_rate
        if not 1 <= channels <= MAX_CHANNELS:
            raise ReferenceAudioError(f"must be mono or stereo, got {channels} channels")
        if not MIN_RATE <= rate <= MAX_RATE:
            raise ReferenceAudioError(f"sample rate must be {MIN_RATE} to {MAX_RATE} Hz, got {rate} Hz")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        pieces: list[np.ndarray] = []
        decoded = 0.0
        try:
            for frame in container.decode(stream):
                raw = frame.to_ndarray()
                if raw.dtype.kind == "f" and not np.isfinite(raw).all():
                    raise ReferenceAudioError("the audio holds NaN or infinite samples")
                decoded += frame.samples / frame.sample_rate
                if decoded > MAX_SECONDS + 0.5:
                    raise ReferenceAudioError(f"must be {MIN_SECONDS:g} to {MAX_SECONDS:g} s long, got more")
                pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except (av.FFmpegError, ValueError) as exc:
            if isinstance(exc, ReferenceAudioError):
                raise
            raise ReferenceAudioError(f"the audio cannot be decoded (truncated or corrupt: {exc})") from exc
    samples = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    seconds = len(samples) / sample_rate
    if not MIN_SECONDS <= seconds <= MAX_SECONDS + 0.05:
        raise ReferenceAudioError(f"must be {MIN_SECONDS:g} to {MAX_SECONDS:g} s long, got {seconds:.2f} s")
    if not np.isfinite(samples).all():
        raise ReferenceAudioError("the audio holds NaN or infinite samples")
    if float(np.abs(samples).max()) < SILENCE_PEAK:
        raise ReferenceAudioError("the audio is silent: record a few seconds of clear speech")
    return ReferenceAudio(np.clip(samples, -1.0, 1.0), sample_rate, rate, channels)


async def decode_reference_async(data: bytes, sample_rate: int = 24_000) -> ReferenceAudio:
    """Off the event loop, and bounded in time: a pathological file is refused, not waited for."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(decode_reference, data, sample_rate), DECODE_TIMEOUT_S)
    except TimeoutError:
        raise ReferenceAudioError(f"decoding took longer than {DECODE_TIMEOUT_S:g} s") from None
