"""The engine on the tiny checkpoint: WAV output, batching equivalence, voices, frame budgets, loading."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tts_service.batching import synthesize_jobs
from tts_service.engine import (
    ModelLoadError,
    SynthesisRequest,
    TTSEngine,
    UnknownVoiceError,
    check_model_source,
    frame_budget,
)
from tts_service.schemas import SynthesisJob
from tts_service.settings import Settings


def decode(wav: bytes) -> tuple[np.ndarray, int, sf._SoundFileInfo]:
    info = sf.info(io.BytesIO(wav))
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    return samples, rate, info


@pytest.fixture()
def captured_codes(engine: TTSEngine) -> Iterator[list[list[torch.Tensor]]]:
    """Record the codec codes each generate call hands to the (real) speech decoder."""
    tokenizer = engine.model.model.speech_tokenizer
    original = tokenizer.decode
    calls: list[list[torch.Tensor]] = []

    def recording_decode(encoded):
        calls.append([item["audio_codes"].clone() for item in encoded])
        return original(encoded)

    tokenizer.decode = recording_decode
    try:
        yield calls
    finally:
        tokenizer.decode = original


def test_wav_is_pcm16_mono_at_the_model_rate_in_whole_frames(engine: TTSEngine) -> None:
    [result] = engine.synthesize([SynthesisRequest("Hello from the gallery.", "ryan", "english")])
    samples, rate, info = decode(result.wav)
    assert (rate, info.channels, info.subtype, info.format) == (24000, 1, "PCM_16", "WAV")
    assert result.sample_rate == 24000
    assert len(samples) == result.num_samples == result.frames * 1920 > 0
    assert result.duration_s == pytest.approx(result.frames / 12.5)
    assert np.abs(samples).max() > 1000  # audible


def test_batched_greedy_output_equals_single_output(engine: TTSEngine, captured_codes) -> None:
    requests = [
        SynthesisRequest("Hello world.", "ryan", "english"),
        SynthesisRequest("The quick brown fox jumps over the lazy dog.", "vivian", "auto", "Speak cheerfully."),
        SynthesisRequest("你好，世界。", "eric", "chinese"),
        SynthesisRequest("Another sentence here!", "sohee", "korean"),
    ]
    singles = [engine.synthesize([r])[0] for r in requests]
    single_codes = [call[0] for call in captured_codes]
    batched = engine.synthesize(requests)
    batch_codes = captured_codes[-1]

    assert len(captured_codes) == len(requests) + 1  # one generate call for the whole batch
    assert len({r.frames for r in singles}) > 1  # items of different lengths were really batched
    for single, batch, s_codes, b_codes in zip(singles, batched, single_codes, batch_codes, strict=True):
        assert torch.equal(s_codes, b_codes)
        assert batch.batch_size == 4 and single.batch_size == 1
        s_samples, _, _ = decode(single.wav)
        b_samples, _, _ = decode(batch.wav)
        assert len(s_samples) == len(b_samples)
        # CPU convolutions differ by ~2e-5 with batch size: at most one 16-bit step.
        assert np.abs(s_samples.astype(int) - b_samples.astype(int)).max() <= 1


def test_every_speaker_and_language_is_accepted_case_insensitively(engine: TTSEngine) -> None:
    assert engine.speakers == ["Aiden", "Dylan", "Eric", "Ono_Anna", "Ryan", "Serena", "Sohee", "Uncle_Fu", "Vivian"]
    assert len(engine.languages) == 11
    requests = [
        SynthesisRequest("Hi.", engine.resolve_speaker(name.upper()), engine.resolve_language(lang.title()))
        for name, lang in zip(engine.speakers, engine.languages, strict=False)
    ]
    requests.append(SynthesisRequest("Hi.", engine.resolve_speaker("ryan"), engine.resolve_language("SPANISH")))
    requests.append(SynthesisRequest("Hi.", engine.resolve_speaker(" Uncle_fu "), engine.resolve_language(None)))
    results = engine.synthesize(requests)
    assert all(r.num_samples > 0 for r in results)
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


def test_a_bad_job_does_not_fail_the_rest_of_its_batch(engine: TTSEngine) -> None:
    jobs = [
        SynthesisJob(text="First.", speaker="Ryan"),
        SynthesisJob(text="Second.", speaker="Nobody"),
        SynthesisJob(text="Third.", speaker="Vivian", language="Elvish"),
        SynthesisJob(text="   ", speaker="Vivian"),
        SynthesisJob(text="Fifth.", speaker="aiden", language="English"),
    ]
    outcomes = synthesize_jobs(engine, jobs)
    assert [o.error_field for o in outcomes] == [None, "speaker", "language", "text", None]
    assert outcomes[1].allowed == engine.speakers and outcomes[1].wav is None
    assert outcomes[0].batch_size == outcomes[4].batch_size == 2
    assert decode(outcomes[4].wav)[1] == 24000


def test_frame_budget_grows_with_text_and_respects_the_ceiling() -> None:
    assert frame_budget("Hi", 2048) < frame_budget("Hi " * 50, 2048) <= 2048
    assert frame_budget("你好" * 10, 2048) > frame_budget("ab" * 10, 2048)  # CJK reads slower per character
    assert frame_budget("x" * 4096, 2048) == 2048
    assert frame_budget("x" * 4096, 100) == 100


def test_budget_truncates_runaway_items_only(tiny_dir: Path, cache_dir: Path) -> None:
    engine = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, max_new_tokens=6))
    long_item, short_item = engine.synthesize(
        [
            SynthesisRequest("The quick brown fox jumps over the lazy dog.", "ryan", "english"),  # ~43 frames unbounded
            SynthesisRequest("Testing one two three, testing.", "ryan", "english"),  # ends by EOS at 4 frames
        ]
    )
    assert (long_item.frames, long_item.truncated) == (6, True)
    assert (short_item.frames, short_item.truncated) == (4, False)


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
