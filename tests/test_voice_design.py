"""A VoiceDesign model through the step engine (issue 16's designed voices): no speaker, the instruction
describes the voice; greedy codes equal qwen-tts's own `generate_voice_design`, alone and batched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.oracle import reference
from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint
from tts_service.engine import SynthesisRequest, TTSEngine, UnknownVoiceError
from tts_service.settings import Settings

# Chosen for their greedy lengths on the tiny VoiceDesign checkpoint: 37, 12, 27 and 64 frames.
DESIGNED = [
    SynthesisRequest(
        "Please keep your hands inside the vehicle at all times and enjoy the ride through the ancient forest.",
        "",
        "english",
        "An old harbour master, gravelly.",
    ),
    SynthesisRequest("これは日本語のテキストです。", "", "auto", "A small friendly robot."),
    SynthesisRequest(
        "The museum opens at nine and closes at six every day except Monday.", "", "english", "A small friendly robot."
    ),
    SynthesisRequest(
        "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen.",
        "",
        "english",
        "",
    ),
]


@pytest.fixture(scope="module")
def design_engine(cache_dir: Path) -> TTSEngine:
    model = ensure_tiny_checkpoint(cache_dir, kind="voice_design")
    return TTSEngine.load(Settings(model=str(model), cache_dir=cache_dir, greedy=True, device="cpu"))


def test_a_voice_design_model_loads_without_speakers(design_engine: TTSEngine) -> None:
    assert design_engine.kind == "voice_design" and design_engine.speakers == []
    assert design_engine.supports_instruct
    request = design_engine.request_for("Hi.", "", "english", "A warm voice.")
    assert request.speaker == "" and request.instruct == "A warm voice."
    with pytest.raises(UnknownVoiceError):
        design_engine.request_for("Hi.", "Ryan", "english", "A warm voice.")  # no built-in speakers here


def test_designed_voices_equal_qwen_tts_alone_and_batched(design_engine: TTSEngine) -> None:
    references = {r.text: reference(design_engine, r)[0] for r in DESIGNED}
    assert len({len(codes) for codes in references.values()}) > 1  # lengths differ, so rows leave mid-batch
    for request in DESIGNED:  # alone
        end = design_engine.submit(request, f"alone-{request.text[:8]}", stream=False)
        end.collect()
        np.testing.assert_array_equal(end.end.codes, references[request.text], err_msg=request.text)
    handles = [design_engine.submit(r, f"batch-{i}", stream=False) for i, r in enumerate(DESIGNED)]  # together
    for handle, request in zip(handles, DESIGNED, strict=True):
        handle.collect()
        assert handle.end.max_batch == len(DESIGNED)
        np.testing.assert_array_equal(handle.end.codes, references[request.text], err_msg=request.text)
