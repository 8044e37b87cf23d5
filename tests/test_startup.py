"""`bentoml serve` with a model that cannot load stops with one clear message instead of looping."""

from __future__ import annotations

import gc
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LiveServer, start_server, stop_server
from tts_service.startup import freeze_loaded_objects


def serve_until_exit(env: dict[str, str], log: Path, timeout_s: float = 90) -> tuple[int, str]:
    server = start_server(env, log)
    try:
        code = server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_server(server)
        pytest.fail(f"server kept running with a broken model:\n{server.log()[-3000:]}")
    return code, server.log()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/no/such/checkpoint", "is neither a checkpoint folder nor a Hugging Face repo id"),
        ("Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice", "Could not fetch TTS_MODEL='Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice'"),
    ],
)
def test_unreachable_model_refuses_to_start(model: str, message: str, tmp_path: Path) -> None:
    code, log = serve_until_exit({"TTS_MODEL": model, "HF_HUB_CACHE": str(tmp_path / "hub")}, tmp_path / "log")
    assert code != 0
    assert message in log and "TTS_MODEL=tiny" in log
    assert "Traceback" not in log


def test_corrupt_checkpoint_stops_the_server(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_dir.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"garbage")
    code, log = serve_until_exit({"TTS_MODEL": str(broken)}, tmp_path / "log")
    assert log.count("TTS service cannot start: Could not load a Qwen3-TTS checkpoint") == 1
    assert "stopping the server" in log


def test_qwen_tts_imports_without_banners_even_without_sox(tmp_path: Path) -> None:
    """Its 25 Hz tokenizer prints a flash-attn banner and a SoX warning on import; the 12 Hz models use
    neither, so serving needs neither installed, and the log stays clean."""
    import sys

    code = (
        "import sys; from tts_service.dev.tiny_checkpoint import build_tiny_checkpoint; "
        "from tts_service.engine import import_qwen_tts; build_tiny_checkpoint(sys.argv[1]); "
        "print(import_qwen_tts().Qwen3TTSModel.__name__)"
    )
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}  # no sox on this PATH
    command = [sys.executable, "-c", code, str(tmp_path / "tiny")]  # building the tiny model imports qwen-tts too
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Qwen3TTSModel"
    assert result.stderr.strip() == ""


def test_start_up_objects_are_frozen_out_of_garbage_collection() -> None:
    """A full collection walks every tracked object with the GIL held: 100 ms in the front service and 300 ms
    in the synthesizer after start-up (measured), one stalled request or every stream at once. Objects alive
    when a process has started are moved out of the collector's reach; later ones are still collected."""
    before = [object()]  # a list: tracked by the collector
    assert any(item is before for item in gc.get_objects())
    try:
        freeze_loaded_objects("test")
        assert gc.get_freeze_count() > 1000
        assert not any(item is before for item in gc.get_objects())
        after = [object()]
        assert any(item is after for item in gc.get_objects())
    finally:
        gc.unfreeze()


def test_every_serving_process_freezes_its_start_up_objects(server: LiveServer) -> None:
    """The decoder process's line shows too: it logs to the server's console at the service's level."""
    log = server.log()
    pids = {}
    for service in ("front service", "synthesizer", "decoder process"):
        found = re.search(rf"\[(?:decoder )?pid (\d+)(?: of pid (\d+))?\] {service}: \d+ start-up objects frozen", log)
        assert found, service
        pids[service] = found.groups()
    # Each line names its process, and the decoder process's names the synthesizer worker it serves.
    assert pids["decoder process"][1] == pids["synthesizer"][0]
    assert len({pids[s][0] for s in pids}) == 3


def test_a_model_that_does_not_fit_says_which_settings_make_it_fit(
    tiny_dir: Path, cache_dir: Path, monkeypatch
) -> None:
    """Out of memory while loading, the error names the KV cache's size (its slot count and positions) and
    the other models loaded, instead of torch's bare out-of-memory message; other failures pass unchanged."""
    import torch

    from tts_service import frame_step as fs
    from tts_service import scheduler
    from tts_service.engine import ModelLoadError, TTSEngine, import_qwen_tts
    from tts_service.settings import Settings

    slots, positions = 3, 64 + 1536
    settings = Settings(model=str(tiny_dir), cache_dir=cache_dir, device="cpu", max_batch_size=slots, max_new_tokens=64)
    real_allocate = scheduler.fs.allocate_state

    def allocate(weights, *args):
        measured.append(fs.kv_bytes_per_slot(weights, positions))  # the scheduler's own count of a slot
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.00 GiB.\nmore lines")

    measured: list[int] = []
    monkeypatch.setattr(scheduler.fs, "allocate_state", allocate)
    with pytest.raises(ModelLoadError) as raised:
        TTSEngine.load(settings)
    message = str(raised.value)
    assert message.startswith("TTS_MODEL ran out of memory while allocating its KV cache")
    assert f"its KV cache takes 3 slots of {measured[0] / 1e6:,.0f} MB" in message
    assert f"TTS_MAX_BATCH_SIZE (KV slots, now {slots})" in message
    assert f"TTS_MAX_NEW_TOKENS + TTS_MAX_PROMPT_TOKENS (positions per slot, now {positions})" in message
    assert "load fewer models" not in message
    assert message.endswith("(OutOfMemoryError: CUDA out of memory. Tried to allocate 13.00 GiB.)")

    monkeypatch.setattr(scheduler.fs, "allocate_state", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="^boom$"):  # not an out-of-memory error: as it was
        TTSEngine.load(settings)
    monkeypatch.setattr(scheduler.fs, "allocate_state", real_allocate)

    def load_weights(*args, **kwargs):  # a CUDA library's error, raised from inside another
        try:
            raise RuntimeError("Triton Error [CUDA]: out of memory")
        except RuntimeError as exc:
            raise ValueError("while loading") from exc

    monkeypatch.setattr(import_qwen_tts().Qwen3TTSModel, "from_pretrained", load_weights)
    with pytest.raises(ModelLoadError) as raised:
        TTSEngine.load(settings.model_copy(update={"clone_model": str(tiny_dir)}), "TTS_MODEL")
    message = str(raised.value)
    assert message.startswith("TTS_MODEL ran out of memory while loading its weights: lower TTS_MAX_BATCH_SIZE")
    assert "or load fewer models (TTS_CLONE_MODEL also set)" in message and "its KV cache" not in message
