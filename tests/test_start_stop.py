"""A clean start and stop of a real `bentoml serve`, whatever was probed while the model loaded.

BentoML 1.4.39 left `/readyz` unanswered while the synthesizer loaded (300 s, then a 500), and the
pending probe kept the entry worker from stopping after SIGTERM: it was left orphaned. Loading is
slowed here with the test fault injector, as a large checkpoint would be.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO_ROOT, LiveServer, start_server, stop_server

LOAD_DELAY_S = 15  # long enough for several probes after the entry service binds its port, on a slow machine too
PROBE_TIMEOUT_S = 3.0


def slow_loading_server(cache_dir: Path, log: Path) -> LiveServer:
    env = {
        "TTS_MODEL": "tiny",
        "TTS_CACHE_DIR": str(cache_dir),
        "TTS_TEST_LOAD_DELAY_S": str(LOAD_DELAY_S),
        "PYTHONPATH": str(REPO_ROOT / "tests" / "faults"),
    }
    return start_server(env, log)


def probe_until(server: LiveServer, want: int, deadline_s: float) -> list[tuple[int, float]]:
    """Poll /readyz as a health check does, until it answers `want`; (status, seconds) of each answer."""
    answers: list[tuple[int, float]] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            status = httpx.get(f"{server.url}/readyz", timeout=60).status_code
        except httpx.ConnectError:  # the port is not bound yet
            time.sleep(0.3)
            continue
        answers.append((status, time.monotonic() - started))
        if status == want:
            return answers
        time.sleep(0.3)
    pytest.fail(f"/readyz did not answer {want} within {deadline_s} s: {answers}\n{server.log()[-3000:]}")


def stop_and_check(server: LiveServer, signum: signal.Signals) -> float:
    """Send `signum` to `bentoml serve`; every process it started must be gone within 10 s."""
    processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    assert len(processes) >= 3, processes  # the server, the entry worker, the synthesizer worker
    started = time.monotonic()
    server.process.send_signal(signum)
    try:
        server.process.wait(timeout=10)
        gone, alive = psutil.wait_procs(processes, timeout=max(0.1, 10 - (time.monotonic() - started)))
    finally:
        stop_server(server)  # only cleans up after a failure: everything is gone by now otherwise
    left = [" ".join(p.cmdline())[-120:] for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running after {signum.name}: {left}"
    return time.monotonic() - started


def test_readyz_answers_503_fast_while_loading_then_200_and_sigint_stops_everything(
    cache_dir: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    server = slow_loading_server(cache_dir, tmp_path / "serve.log")
    try:
        answers = probe_until(server, 200, LOAD_DELAY_S + 120)
    except BaseException:
        stop_server(server)
        raise
    loading = [seconds for status, seconds in answers[1:] if status == 503]  # the first may wait for the worker
    assert len(loading) >= 3, answers
    assert max(loading) < PROBE_TIMEOUT_S, answers
    assert {status for status, _ in answers} <= {200, 503}, answers
    tree = psutil.Process(server.process.pid).children(recursive=True)
    assert any("tts_service.decoder_process" in " ".join(p.cmdline()) for p in tree), "no decoder process"
    streaming, received = threading.Event(), []

    def listen() -> None:  # a long stream, in progress when the signal comes
        body = {"text": "A long line that keeps the engine busy for a while. " * 6, "speaker": "Ryan"}
        try:
            with httpx.stream("POST", f"{server.url}/v1/tts/stream", json=body, timeout=60) as response:
                for chunk in response.iter_bytes():
                    received.append(len(chunk))
                    streaming.set()
        except httpx.HTTPError:
            pass

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert streaming.wait(60), server.log()[-3000:]
    assert stop_and_check(server, signal.SIGINT) < 10  # the decoder process (a grandchild) included
    log = server.log()
    # the synthesizer's engine was closed before its process exited, and nothing aborted
    assert "Completed cleanup hook: close" in log and "terminate called" not in log, log[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_server_probed_while_loading_stops_within_10_s(
    signum: signal.Signals, cache_dir: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    server = slow_loading_server(cache_dir, tmp_path / "serve.log")
    try:
        answers = probe_until(server, 503, 120)
        answers += probe_until(server, 503, 10)  # a second probe, as a health check repeats
    except BaseException:
        stop_server(server)
        raise
    assert all(status == 503 for status, _ in answers), answers
    assert server.process.poll() is None
    stop_and_check(server, signum)


def test_the_readiness_probe_of_a_dependency_never_raises() -> None:
    """The probe's own timeout used to escape as asyncio.TimeoutError instead of answering False."""
    import asyncio

    from tts_service.bentoml_fixes import quiet_readiness_probe

    class Proxy:
        async def is_ready(self, timeout: float | None = None) -> bool:
            await asyncio.sleep(timeout or 0)
            raise TimeoutError

    proxy = Proxy()
    quiet_readiness_probe(proxy)
    started = time.monotonic()
    assert asyncio.run(proxy.is_ready(0.2)) is False
    assert time.monotonic() - started < 2


def test_a_route_that_crashes_before_answering_gets_a_500_at_once() -> None:
    import asyncio

    from tts_service.bentoml_fixes import AnswerInJson

    async def crashing(scope, receive, send):
        raise RuntimeError("boom")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    for path, shape in (("/readyz", "detail"), ("/v1/audio/speech", "error")):
        sent.clear()
        asyncio.run(AnswerInJson(crashing)({"type": "http", "path": path, "method": "GET"}, receive, send))
        assert sent[0]["status"] == 500
        assert shape in sent[1]["body"].decode()
