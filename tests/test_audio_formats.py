"""Encoding to every served format and the pitch-keeping tempo change, on a known signal."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from tts_service.audio import AUDIO_FORMATS, CONTENT_TYPES, atempo_stages, encode, encode_wav, render, time_stretch

RATE = 24000


def tone(seconds: float = 1.0, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * RATE / len(samples))


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int, int]:
    """Samples, rate and channels, via libsndfile or (AAC) FFmpeg."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, RATE, 1
    if fmt == "aac":
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            assert stream.codec_context.name == "aac"
            frames = [frame.to_ndarray().reshape(-1) for frame in container.decode(stream)]
            return np.concatenate(frames), stream.rate, stream.codec_context.channels
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples[:, 0], rate, samples.shape[1]


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_every_format_decodes_to_the_same_rate_channels_duration_and_pitch(fmt: str) -> None:
    samples, rate, channels = decode(encode(tone(), RATE, fmt), fmt)
    assert (rate, channels) == (RATE, 1)
    # Lossy codecs add encoder delay/padding (AAC: up to 2 frames of 1024 samples).
    assert len(samples) / RATE == pytest.approx(1.0, abs=0.1 if fmt == "aac" else 0.01)
    assert dominant_hz(samples[: RATE // 2]) == pytest.approx(220, abs=5)


def test_container_signatures_and_content_types() -> None:
    magic = {"wav": b"RIFF", "flac": b"fLaC", "opus": b"OggS"}
    for fmt, head in magic.items():
        assert encode(tone(), RATE, fmt).startswith(head)
    assert encode(tone(), RATE, "aac")[:2] in (b"\xff\xf1", b"\xff\xf9")  # ADTS sync word
    assert b"OpusHead" in encode(tone(), RATE, "opus")[:64]
    assert set(CONTENT_TYPES) == set(AUDIO_FORMATS)
    assert CONTENT_TYPES["mp3"] == "audio/mpeg" and CONTENT_TYPES["wav"] == "audio/wav"


def test_pcm_is_exactly_the_wav_data_chunk() -> None:
    pcm = encode(tone(0.3), RATE, "pcm")
    assert len(pcm) == 2 * int(RATE * 0.3)
    assert render(pcm, RATE, "pcm").data == pcm  # passed through, not re-encoded
    wav = render(pcm, RATE, "wav").data
    assert wav == encode_wav(tone(0.3), RATE)
    assert wav.endswith(pcm) and len(wav) - len(pcm) == 44  # a plain 44-byte RIFF header, then the same samples


def test_16_bit_samples_are_rounded_to_nearest_and_the_same_in_pcm_wav_and_flac() -> None:
    steps = np.arange(-32768, 32767, dtype=np.float64)
    samples = np.concatenate(
        [
            np.random.default_rng(0).uniform(-1.2, 1.2, 200_000),
            steps / 32768,  # every 16-bit value exactly
            (steps + 0.4) / 32768,
            [1.0, -1.0, 1.5, -1.5, 1e-12, -1e-12, 0.0, 0.6 / 32768, -0.6 / 32768],
        ]
    ).astype(np.float32)
    expected = np.clip(np.rint(np.clip(samples, -1, 1) * np.float32(32768)), -32768, 32767).astype("<i2")
    pcm = encode(samples, RATE, "pcm")
    assert pcm == expected.tobytes()
    assert np.array_equal(np.frombuffer(pcm, "<i2")[-9:], [32767, -32768, 32767, -32768, 0, 0, 0, 1, -1])
    assert np.array_equal(np.frombuffer(pcm, "<i2")[200_000 : 200_000 + 65535], steps)
    for fmt in ("wav", "flac"):
        decoded, _ = sf.read(io.BytesIO(encode(samples, RATE, fmt)), dtype="int16")
        assert np.array_equal(decoded, expected), fmt


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.5, 2.0, 4.0])
def test_time_stretch_changes_duration_and_keeps_pitch(speed: float) -> None:
    stretched = time_stretch(tone(2.0), RATE, speed)
    assert len(stretched) / RATE == pytest.approx(2.0 / speed, rel=0.03)
    assert dominant_hz(stretched) == pytest.approx(220, abs=5)  # resampling would give 220 * speed


def test_render_applies_speed_before_encoding() -> None:
    fast = render(encode(tone(2.0), RATE, "pcm"), RATE, "flac", speed=2.0)
    assert fast.content_type == "audio/flac" and fast.sample_rate == RATE
    assert fast.seconds == pytest.approx(1.0, rel=0.03)
    assert sf.info(io.BytesIO(fast.data)).frames == fast.num_samples


def test_atempo_stages_and_limits() -> None:
    assert atempo_stages(2.0) == [2.0]
    assert atempo_stages(0.25) == [0.5, 0.5]
    assert np.prod(atempo_stages(0.3)) == pytest.approx(0.3)
    for bad in (0.2, 4.5):
        with pytest.raises(ValueError, match="between 0.25 and 4.0"):
            atempo_stages(bad)
    with pytest.raises(ValueError, match="allowed: wav, flac, mp3, opus, aac, pcm"):
        render(encode(tone(0.1), RATE, "pcm"), RATE, "ogg")


def test_empty_audio_encodes() -> None:
    for fmt in AUDIO_FORMATS:
        assert isinstance(encode(np.zeros(0, dtype=np.float32), RATE, fmt), bytes)
