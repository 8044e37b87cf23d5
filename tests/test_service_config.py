"""What service.py declares to BentoML: GPU on the model owner only, no request-level batcher (the engine
batches at every step), bind address, CORS."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture()
def service_module(monkeypatch: pytest.MonkeyPatch):
    for name in list(os.environ):
        if name.startswith("TTS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TTS_MAX_BATCH_SIZE", "12")
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    sys.modules.pop("service", None)
    yield importlib.import_module("service")
    sys.modules.pop("service", None)


def test_declarations(service_module) -> None:
    front, synth = service_module.TTSService, service_module.Synthesizer
    assert synth.config["resources"] == {"gpu": 1}
    assert "resources" not in front.config  # a second gpu:1 service would see no GPU
    assert not any(api.batchable for api in synth.apis.values())  # the engine batches, per decode step
    assert {"synthesize_file", "stream_pcm", "cancel_stream", "model_info"} <= set(synth.apis)
    assert front.apis["synthesize"].route == "/v1/tts/synthesize"
    http = front.config["http"]
    assert (http["host"], http["port"]) == ("0.0.0.0", 8000)
    assert http["cors"]["enabled"] and http["cors"]["access_control_allow_origins"] == ["*"]
    assert front.dependencies["synthesizer"].on is synth


def test_the_front_service_does_not_import_torch() -> None:
    """Every BentoML worker imports service.py; only the synthesizer's needs torch and the engine. Importing
    them in the front cost it about 500 MB of resident memory and a second of start-up."""
    check = "import sys, service; print(sorted(m for m in ('torch', 'qwen_tts', 'transformers') if m in sys.modules))"
    env = {**os.environ, "TTS_MODEL": "tiny"}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
