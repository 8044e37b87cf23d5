"""Audio encoding and tempo change for the bytes clients receive.

libsndfile (soundfile) writes WAV, FLAC, MP3 and Ogg Opus; FFmpeg (PyAV) writes AAC and changes
tempo with its `atempo` filter, which keeps pitch (WSOLA), unlike resampling.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import soundfile as sf

if TYPE_CHECKING:
    import av

AudioFormat = Literal["wav", "flac", "mp3", "opus", "aac", "pcm"]
AUDIO_FORMATS: tuple[str, ...] = get_args(AudioFormat)

CONTENT_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # an Ogg Opus file (RFC 7845); browsers play it under this type
    "aac": "audio/aac",  # ADTS stream
    "pcm": "audio/pcm",  # raw signed 16-bit little-endian mono, as OpenAI defines `pcm`
}

_SOUNDFILE_FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}  # and "pcm": raw 16-bit samples (pcm16)

MIN_SPEED = 0.25
MAX_SPEED = 4.0
_ATEMPO_MIN = 0.5  # one atempo stage slows down at most 2x; slower speeds chain stages
_TAIL_PAD_SAMPLES = 12000  # 0.5 s at 24 kHz: more than atempo's window at any speed


@dataclass(frozen=True)
class EncodedAudio:
    data: bytes
    content_type: str
    sample_rate: int
    num_samples: int

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate if self.sample_rate else 0.0


def _mono(samples: np.ndarray) -> np.ndarray:
    """Flat samples: 16-bit integers pass through unscaled (no rounding drift), floats are clipped."""
    samples = np.asarray(samples).reshape(-1)
    if samples.dtype == np.int16:
        return samples
    return np.clip(samples.astype(np.float32), -1.0, 1.0)


def _float(samples: np.ndarray) -> np.ndarray:
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    return samples


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM mono WAV: the one format every client (Unity, browsers, curl | aplay) plays."""
    return encode(samples, sample_rate, "wav")


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit samples as stored, so re-encoding to WAV, FLAC or PCM is lossless."""
    samples, sample_rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=False)
    return np.asarray(samples).reshape(-1), int(sample_rate)


def pcm16(samples: np.ndarray) -> np.ndarray:
    """16-bit samples: floats (clipped to +-1) scaled by 32768, rounded to nearest and clipped to the
    16-bit range, as libsndfile scales them; 16-bit integers pass through. Done here, in numpy, for raw
    PCM, WAV and FLAC alike: the three carry the same samples by construction, and no libsndfile I/O
    callbacks hold the GIL that the engine loop shares (this runs for every chunk and whole file)."""
    mono = _mono(samples)
    if mono.dtype == np.int16:
        return mono
    return np.clip(np.rint(mono * np.float32(32768)), -32768, 32767).astype(np.int16)


def encode(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    if fmt == "pcm":
        return pcm16(samples).astype("<i2", copy=False).tobytes()
    mono = _mono(samples)
    if fmt == "aac":
        return _encode_aac(_float(mono), sample_rate)
    if fmt not in _SOUNDFILE_FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; allowed: {', '.join(AUDIO_FORMATS)}")
    container, subtype = _SOUNDFILE_FORMATS[fmt]
    if subtype == "PCM_16":
        mono = pcm16(mono)  # written as they are
    buffer = io.BytesIO()
    sf.write(buffer, mono, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def _av() -> ModuleType:
    """PyAV (FFmpeg), imported on first use: only AAC and `speed` need it, so the engine (which imports
    this module) runs without it, as the GPU benchmark kit does (scripts/gpu/)."""
    import av
    import av.filter

    return av


def _audio_frame(mono: np.ndarray, sample_rate: int) -> av.AudioFrame:
    av = _av()
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono.reshape(1, -1)), format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = 0
    return frame


def _encode_aac(mono: np.ndarray, sample_rate: int) -> bytes:
    av = _av()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="adts") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        if mono.size:
            for packet in stream.encode(_audio_frame(mono, sample_rate)):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def atempo_stages(speed: float) -> list[float]:
    """FFmpeg's atempo handles 0.5..100 per stage; slower speeds are chained halvings."""
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
    stages = []
    while speed < _ATEMPO_MIN:
        stages.append(_ATEMPO_MIN)
        speed /= _ATEMPO_MIN
    stages.append(speed)
    return stages


def time_stretch(samples: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Play `speed` times faster at the same pitch; 1.0 returns the samples untouched."""
    mono = _mono(samples)
    if speed == 1.0 or mono.size == 0:
        return mono
    target = round(mono.size / speed)
    # atempo drops up to one analysis window at the end; trailing silence carries the real tail through,
    # and the result is cut to the exact duration.
    mono = np.concatenate([_float(mono), np.zeros(_TAIL_PAD_SAMPLES, dtype=np.float32)])
    av = _av()
    graph = av.filter.Graph()
    node = graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono")
    for stage in atempo_stages(speed):
        nxt = graph.add("atempo", f"{stage:.6f}")
        node.link_to(nxt)
        node = nxt
    sink = graph.add("abuffersink")
    node.link_to(sink)
    graph.configure()
    graph.push(_audio_frame(mono, sample_rate))
    graph.push(None)
    chunks = []
    while True:
        try:
            chunks.append(graph.pull().to_ndarray().reshape(-1))
        except (av.error.EOFError, av.error.BlockingIOError):
            break
    out = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)
    return np.pad(out[:target], (0, max(0, target - out.size)))


def render(pcm: bytes, sample_rate: int, fmt: str = "wav", speed: float = 1.0) -> EncodedAudio:
    """The synthesizer's 16-bit PCM, at the asked speed, in the asked format (encoded once)."""
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unknown audio format {fmt!r}; allowed: {', '.join(AUDIO_FORMATS)}")
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.int16)
    samples = time_stretch(samples, sample_rate, speed)
    data = pcm if fmt == "pcm" and speed == 1.0 else encode(samples, sample_rate, fmt)
    return EncodedAudio(data, CONTENT_TYPES[fmt], sample_rate, int(samples.size))
