"""The engine on the tiny checkpoint: WAV output, voices, request checks, frame budgets, loading.
(Equality with qwen-tts under every kind of batching is in test_step_engine.py.)"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tts_service.engine import (
    ModelLoadError,
    SynthesisRequest,
    TTSEngine,
    UnknownVoiceError,
    frame_budget,
)
from tts_service.model_source import check_model_source
from tts_service.settings import Settings


def decode(wav: bytes) -> tuple[np.ndarray, int, sf._SoundFileInfo]:
    info = sf.info(io.BytesIO(wav))
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    return samples, rate, info


def test_wav_is_pcm16_mono_at_the_model_rate_in_whole_frames(engine: TTSEngine) -> None:
    result = engine.synthesize(SynthesisRequest("Hello from the gallery.", "ryan", "english"))
    samples, rate, info = decode(result.wav)
    assert (rate, info.channels, info.subtype, info.format) == (24000, 1, "PCM_16", "WAV")
    assert result.sample_rate == 24000
    assert len(samples) == result.num_samples == result.frames * 1920 > 0
    assert result.duration_s == pytest.approx(result.frames / 12.5)
    assert np.abs(samples).max() > 1000  # audible


def test_every_speaker_and_language_is_accepted_case_insensitively(engine: TTSEngine) -> None:
    assert engine.speakers == ["Aiden", "Dylan", "Eric", "Ono_Anna", "Ryan", "Serena", "Sohee", "Uncle_Fu", "Vivian"]
    assert len(engine.languages) == 11
    requests = [
        SynthesisRequest("Hi.", engine.resolve_speaker(name.upper()), engine.resolve_language(lang.title()))
        for name, lang in zip(engine.speakers, engine.languages, strict=False)
    ]
    requests.append(SynthesisRequest("Hi.", engine.resolve_speaker("ryan"), engine.resolve_language("SPANISH")))
    requests.append(SynthesisRequest("Hi.", engine.resolve_speaker(" Uncle_fu "), engine.resolve_language(None)))
    handles = [engine.submit(r, f"case-{i}", stream=False) for i, r in enumerate(requests)]
    assert all(len(np.concatenate(list(h))) > 0 and h.end.error is None for h in handles)
    assert engine.resolve_language("") == "auto"


@pytest.mark.parametrize(
    ("field", "value"),
    [("speaker", "Bob"), ("speaker", "../etc/passwd"), ("language", "klingon"), ("language", "beijing_dialect")],
)
def test_unknown_voices_are_rejected_with_the_allowed_values(engine: TTSEngine, field: str, value: str) -> None:
    resolve = engine.resolve_speaker if field == "speaker" else engine.resolve_language
    with pytest.raises(UnknownVoiceError) as caught:
        resolve(value)
    assert caught.value.field == field
    assert caught.value.allowed == (engine.speakers if field == "speaker" else engine.languages)
    assert value in str(caught.value) and "allowed:" in str(caught.value)


def test_requests_are_checked_against_the_loaded_model(engine: TTSEngine) -> None:
    request = engine.request_for("  First.  ", " RYAN ", "English", " Warmly. ", seed=7)
    assert request == SynthesisRequest("First.", "ryan", "english", "Warmly.", 7)
    with pytest.raises(UnknownVoiceError, match="allowed: Aiden"):
        engine.request_for("Second.", "Nobody")
    with pytest.raises(UnknownVoiceError) as caught:
        engine.request_for("Third.", "Vivian", "Elvish")
    assert caught.value.field == "language" and caught.value.allowed == engine.languages
    with pytest.raises(ValueError, match="empty"):
        engine.request_for("   ", "Vivian")


def test_frame_budget_grows_with_text_and_respects_the_ceiling() -> None:
    assert frame_budget("Hi", 2048) < frame_budget("Hi " * 50, 2048) <= 2048
    assert frame_budget("你好" * 10, 2048) > frame_budget("ab" * 10, 2048)  # CJK reads slower per character
    assert frame_budget("x" * 4096, 2048) == 2048
    assert frame_budget("x" * 4096, 100) == 100


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/does/not/exist", "neither a checkpoint folder nor a Hugging Face repo id"),
        ("not-a-repo-id", "TTS_MODEL=tiny"),
    ],
)
def test_unloadable_models_fail_with_a_clear_message(model: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        check_model_source(model)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        TTSEngine.load(Settings(model=str(tmp_path)))


def test_corrupt_checkpoint_fails_with_a_clear_message(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_dir.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="Could not load a Qwen3-TTS checkpoint"):
        TTSEngine.load(Settings(model=str(broken)))


def test_describe_lists_voices_with_details(engine: TTSEngine) -> None:
    info = engine.describe()
    assert [s.name for s in info.speakers] == engine.speakers
    assert {s.name: s.native_language for s in info.speakers}["Sohee"] == "Korean"
    assert (info.sample_rate, info.supports_instruct, info.languages[0]) == (24000, True, "auto")
