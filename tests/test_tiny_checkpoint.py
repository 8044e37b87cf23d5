"""The tiny checkpoint has the real layout and loads and speaks through the real qwen-tts code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from qwen_tts import Qwen3TTSModel

from tts_service.dev.tiny_checkpoint import CODEC_EOS, main
from tts_service.voices import LANGUAGE_IDS, SPEAKERS

GREEDY = {"do_sample": False, "subtalker_dosample": False}


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Qwen3TTSModel:
    return Qwen3TTSModel.from_pretrained(
        str(tiny_dir), device_map="cpu", dtype=torch.float32, attn_implementation="sdpa"
    )


def test_layout_matches_the_released_checkpoints(tiny_dir: Path) -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "speech_tokenizer/config.json",
        "speech_tokenizer/model.safetensors",
        "speech_tokenizer/preprocessor_config.json",
    ):
        assert (tiny_dir / name).is_file(), name
    config = json.loads((tiny_dir / "config.json").read_text())
    talker = config["talker_config"]
    assert config["tts_model_type"] == "custom_voice"
    assert config["tokenizer_type"] == "qwen3_tts_tokenizer_12hz"
    assert talker["spk_id"] == {s.name.lower(): s.codec_id for s in SPEAKERS}
    assert talker["spk_is_dialect"]["dylan"] == "beijing_dialect"
    assert talker["codec_language_id"] == LANGUAGE_IDS
    assert talker["codec_eos_token_id"] == CODEC_EOS == 2150
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert {
        "do_sample",
        "top_k",
        "top_p",
        "temperature",
        "repetition_penalty",
        "subtalker_dosample",
        "subtalker_top_k",
        "subtalker_top_p",
        "subtalker_temperature",
        "max_new_tokens",
    } <= generation.keys()
    total_bytes = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert total_bytes < 40_000_000


def test_loads_with_the_real_speakers_and_languages(model: Qwen3TTSModel) -> None:
    assert model.get_supported_speakers() == sorted(s.name.lower() for s in SPEAKERS)
    languages = model.get_supported_languages()
    assert len(languages) == 11 and "auto" in languages and "english" in languages
    assert not any("dialect" in lang for lang in languages)
    assert model.model.speech_tokenizer.get_output_sample_rate() == 24000


def test_audio_is_audible_text_dependent_and_ends_at_eos(model: Qwen3TTSModel) -> None:
    texts = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Testing one two three, testing."]
    wavs, sample_rate = model.generate_custom_voice(
        text=texts, speaker="Ryan", language="English", max_new_tokens=200, **GREEDY
    )
    assert sample_rate == 24000
    lengths = [len(w) for w in wavs]
    for wav in wavs:
        rms = float(np.sqrt(np.mean(wav**2)))
        assert 0.02 < rms < 0.5, rms  # audible, not clipped
        assert np.abs(wav).max() < 1.0
        assert len(wav) % 1920 == 0
    # EOS ends items at different lengths, all well before the 199-frame limit.
    assert len(set(lengths)) == len(texts), lengths
    assert max(lengths) < 199 * 1920
    shortest = min(lengths)
    assert not np.allclose(wavs[0][:shortest], wavs[1][:shortest], atol=1e-3)


def test_command_line_builds_a_loadable_checkpoint(tmp_path: Path) -> None:
    main([str(tmp_path / "ckpt"), "--seed", "3"])
    model = Qwen3TTSModel.from_pretrained(str(tmp_path / "ckpt"), device_map="cpu", dtype=torch.float32)
    wavs, _ = model.generate_custom_voice(text="Hi", speaker="Vivian", language="Chinese", max_new_tokens=8, **GREEDY)
    assert 0 < len(wavs[0]) <= 7 * 1920
