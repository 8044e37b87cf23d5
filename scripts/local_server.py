"""Start and stop a real `bentoml serve` of this project on a loopback port (tests and benchmarks)."""

from __future__ import annotations

import contextlib
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

REPO_ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))


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


def start_server(
    env_overrides: dict[str, str], log_path: Path, port: int | None = None, repo_root: Path = REPO_ROOT
) -> LiveServer:
    """`repo_root`: another checkout of this repository serves (its service.py and src/ before this venv's)."""
    port = port or free_port()
    # Each server gets its own BENTOML_HOME: `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir
    # when it starts, which would wipe the /metrics of any other server running under the same home.
    home = log_path.parent / f"bentoml-home-{port}"
    env = {
        **os.environ,
        "TTS_HOST": "127.0.0.1",
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(home),
        "TTS_VOICES_DIR": str(log_path.parent / f"voices-{port}"),  # never the user's own library
        **({} if repo_root == REPO_ROOT else {"PYTHONPATH": str(repo_root / "src")}),
        **env_overrides,
    }
    log = log_path.open("wb")
    process = subprocess.Popen(
        [BENTOML, "serve", "service:TTSService", "--host", "127.0.0.1", "--port", str(port)],
        cwd=repo_root,
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
    """SIGTERM to `bentoml serve`, which stops its workers; kill whatever is left after 10 s (a safety net
    for failed tests: tests/test_start_stop.py checks that nothing is ever left)."""
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


@contextlib.contextmanager
def running_server(env_overrides: dict[str, str], log_path: Path, ready_timeout_s: float = 180) -> Iterator[LiveServer]:
    """A started and ready server for the block; always stopped afterwards."""
    server = start_server(env_overrides, log_path)
    try:
        wait_ready(server, ready_timeout_s)
        yield server
    finally:
        stop_server(server)
