"""Shared fixtures: one tiny checkpoint per session, an engine on it, and a live `bentoml serve`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from scripts.local_server import (
    REPO_ROOT,
    LiveServer,
    free_port,
    running_server,
    start_server,
    stop_server,
    wait_ready,
)
from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint
from tts_service.engine import TTSEngine
from tts_service.settings import Settings

__all__ = ["REPO_ROOT", "LiveServer", "free_port", "running_server", "start_server", "stop_server", "wait_ready"]


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google on a closed network.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture()
def page() -> Iterator[Page]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (the README test command installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1600})
        finally:
            browser.close()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tts-cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir: Path) -> Path:
    return ensure_tiny_checkpoint(cache_dir)


@pytest.fixture(scope="session")
def engine(tiny_dir: Path, cache_dir: Path) -> TTSEngine:
    return TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu"))


@pytest.fixture(scope="session")
def deep_engine(cache_dir: Path) -> TTSEngine:
    """The released layer counts (28 talker, 5 code-predictor, 8 decoder layers) at tiny widths."""
    model = ensure_tiny_checkpoint(cache_dir, "deep")
    return TTSEngine.load(Settings(model=str(model), cache_dir=cache_dir, greedy=True, device="cpu"))


@pytest.fixture(scope="session")
def server(tiny_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`bentoml serve` on the tiny checkpoint, greedy so that outputs are reproducible."""
    with running_server(
        {
            "TTS_MODEL": "tiny",
            "TTS_CACHE_DIR": str(cache_dir),
            "TTS_GREEDY": "true",
            "TTS_MAX_TEXT_CHARS": "300",
            "TTS_CORS_ORIGINS": "*",
        },
        tmp_path_factory.mktemp("logs") / "serve.log",
    ) as live:
        yield live


def studio_env(cache_dir: Path, voices_dir: Path) -> dict[str, str]:
    """All three tiny models (CustomVoice, Base for cloning, VoiceDesign), greedy, with this voice library."""
    return {
        "TTS_MODEL": "tiny",
        "TTS_CLONE_MODEL": "tiny",
        "TTS_DESIGN_MODEL": "tiny",
        "TTS_CACHE_DIR": str(cache_dir),
        "TTS_VOICES_DIR": str(voices_dir),
        "TTS_GREEDY": "true",
    }


@pytest.fixture(scope="session")
def studio(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`bentoml serve` with all three tiny models and its own voice library (the saved-voice tests)."""
    env = studio_env(cache_dir, tmp_path_factory.mktemp("studio-voices"))
    with running_server(env, tmp_path_factory.mktemp("studio") / "serve.log") as live:
        yield live


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http
