"""Configuration parsing and WAV encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

from tts_service.audio import encode_wav
from tts_service.settings import DEFAULT_MODEL, Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TTS_MODEL", "TTS_PORT", "TTS_HOST", "TTS_CORS_ORIGINS", "TTS_MAX_TEXT_CHARS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.model == DEFAULT_MODEL == "Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice"
    assert (settings.host, settings.port, settings.cors_origins) == ("0.0.0.0", 8000, ["*"])
    assert settings.max_text_chars == 4096


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTS_CORS_ORIGINS", "http://quest.local, https://demo.example ")
    monkeypatch.setenv("TTS_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("TTS_DEVICE", "CUDA:1")
    monkeypatch.setenv("TTS_GREEDY", "true")
    settings = Settings()
    assert settings.cors_origins == ["http://quest.local", "https://demo.example"]
    assert (settings.max_batch_size, settings.device, settings.greedy) == (16, "cuda:1", True)


@pytest.mark.parametrize(
    ("name", "value"),
    [("TTS_MAX_BATCH_SIZE", "lots"), ("TTS_DEVICE", "tpu"), ("TTS_DTYPE", "int4"), ("TTS_DECODE_ATTENTION", "flash")],
)
def test_invalid_environment_names_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("TTS_").lower()):
        Settings()


def test_encode_wav_round_trips_and_clips() -> None:
    samples = np.array([0.0, 0.5, -0.5, 1.7, -3.0], dtype=np.float32)
    decoded, rate = sf.read(io.BytesIO(encode_wav(samples, 24000)), dtype="int16")
    assert rate == 24000
    assert decoded.tolist() == [0, 16384, -16384, 32767, -32768]
