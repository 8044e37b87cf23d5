"""Closing an engine: its threads stop and are joined, its requests end with an error, and a process that
ends while its engine is mid-step exits cleanly instead of aborting (Python ends a daemon thread that is
inside a torch call with pthread_exit, which aborted a benchmark script in CI: "terminate called without
an active exception")."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tts_service.engine import SynthesisError, SynthesisRequest, TTSEngine
from tts_service.scheduler import ENGINE_CLOSED
from tts_service.settings import Settings

LONG_TEXT = "A long line that keeps the engine stepping for a while. " * 4


def test_closing_an_engine_ends_its_requests_joins_its_threads_and_refuses_new_ones(
    tiny_dir: Path, cache_dir: Path
) -> None:
    engine = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, device="cpu", max_batch_size=1))
    speaker = engine.speakers[0]
    done = engine.synthesize(SynthesisRequest("Hi.", speaker, "auto"))  # before the close: whole
    assert done.frames > 0 and len(done.audio) == done.frames * engine.scheduler.samples_per_frame
    running = engine.submit(SynthesisRequest(LONG_TEXT, speaker, "auto"), "running")
    waiting = engine.submit(SynthesisRequest(LONG_TEXT, speaker, "auto"), "waiting")  # one slot: it queues
    chunks = iter(running)
    assert len(next(chunks)) > 0  # it is mid-stream
    scheduler = engine.scheduler
    assert scheduler._thread.is_alive() and scheduler.decoder._thread.is_alive()

    assert engine.close(timeout_s=30)
    assert not scheduler._thread.is_alive() and not scheduler.decoder._thread.is_alive()
    list(chunks)
    assert running.end.error == ENGINE_CLOSED and running.end.frames < engine.frame_budget(LONG_TEXT)
    list(waiting)
    assert waiting.end.error == ENGINE_CLOSED and waiting.end.frames == 0
    later = engine.submit(SynthesisRequest("Hi.", speaker, "auto"), "later")
    assert list(later) == [] and later.end.error == ENGINE_CLOSED
    with pytest.raises(SynthesisError, match=ENGINE_CLOSED):
        engine.synthesize(SynthesisRequest("Hi.", speaker, "auto"))
    assert engine.close(timeout_s=1)  # twice is harmless
    assert not [t for t in threading.enumerate() if t.name == "tts-step-engine" and t is scheduler._thread]


def test_a_process_that_ends_while_its_engine_is_mid_step_exits_cleanly(tiny_dir: Path, cache_dir: Path) -> None:
    """The engine loop's thread is inside torch calls (which release the GIL) when the script's main thread
    returns. Without the engines closed at exit this aborted every time (exit code 134, SIGABRT)."""
    script = textwrap.dedent(
        f"""
        import threading
        import torch
        from tts_service.engine import SynthesisRequest, TTSEngine
        from tts_service.settings import Settings

        engine = TTSEngine.load(Settings(model={str(tiny_dir)!r}, cache_dir={str(cache_dir)!r}, device="cpu"))
        busy, a = threading.Event(), torch.randn(512, 512)

        def on_step(batch):
            busy.set()
            for _ in range(400):
                a @ a

        engine.scheduler.on_step = on_step
        engine.submit(SynthesisRequest("A line.", engine.speakers[0], "auto"), "r")
        assert busy.wait(120)
        print("leaving mid-step", flush=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaving mid-step" in result.stdout and "terminate called" not in result.stderr
