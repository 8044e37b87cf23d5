"""Shared fixtures: one tiny checkpoint per session, an engine on it, and a live `bentoml serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tts_service.engine import TTSEngine
from tts_service.settings import Settings
from tts_service.tiny_checkpoint import ensure_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tts-cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir: Path) -> Path:
    return ensure_tiny_checkpoint(cache_dir)


@pytest.fixture(scope="session")
def engine(tiny_dir: Path, cache_dir: Path) -> TTSEngine:
    return TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(env_overrides: dict[str, str], log_path: Path, port: int | None = None) -> LiveServer:
    port = port or free_port()
    env = {**os.environ, "TTS_HOST": "127.0.0.1", "BENTOML_DO_NOT_TRACK": "True", **env_overrides}
    log = log_path.open("wb")
    process = subprocess.Popen(
        [BENTOML, "serve", "service:TTSService", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return LiveServer(f"http://127.0.0.1:{port}", process, log_path)


def wait_ready(server: LiveServer, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s} s:\n{server.log()[-4000:]}")


def stop_server(server: LiveServer) -> None:
    """SIGTERM to `bentoml serve`, which stops its workers; kill whatever is left after 10 s.

    BentoML 1.4.39's entry worker does not finish a graceful shutdown if /readyz was polled while the
    synthesizer was still loading (as this fixture does, and as container health checks do).
    """
    try:  # workers run in sessions of their own, so a process-group kill would miss them
        workers = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def server(tiny_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`bentoml serve` on the tiny checkpoint, greedy so that outputs are reproducible."""
    live = start_server(
        {
            "TTS_MODEL": "tiny",
            "TTS_CACHE_DIR": str(cache_dir),
            "TTS_GREEDY": "true",
            "TTS_MAX_TEXT_CHARS": "300",
            "TTS_MAX_BATCH_SIZE": "8",
            "TTS_CORS_ORIGINS": "*",
        },
        tmp_path_factory.mktemp("logs") / "serve.log",
    )
    try:
        wait_ready(live)
        yield live
    finally:
        stop_server(live)


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http
