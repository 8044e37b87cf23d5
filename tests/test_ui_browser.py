"""End to end in headless Chromium: the Streamlit demo, served by `streamlit run`, against `bentoml serve`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page

from tests.conftest import REPO_ROOT, LiveServer, free_port


@pytest.fixture(scope="module")
def streamlit_url(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    env = {**os.environ, "TTS_API_URL": server.url, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO_ROOT / "ui" / "streamlit_app.py")]
            + ["--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_pick_a_speaker_type_text_synthesize_and_play(page: Page, streamlit_url: str, tmp_path: Path) -> None:
    page.goto(streamlit_url)
    page.get_by_text("Model loaded and ready").wait_for(timeout=60_000)

    page.get_by_role("combobox", name="Speaker").first.click()
    page.get_by_role("option", name="Vivian").click()
    page.get_by_label("Text").fill("Welcome to the gallery, traveller.")
    page.get_by_role("button", name="Synthesize").click()

    audio = page.locator("audio").first
    audio.wait_for(state="attached", timeout=120_000)
    page.get_by_text("Latest: Vivian (auto)").wait_for()  # the picked speaker was the one synthesized
    source = audio.get_attribute("src")
    assert source and ".wav" in source
    # The browser itself decodes the file: metadata loads and gives a real duration.
    duration = audio.evaluate(
        """a => new Promise((resolve, reject) => {
            if (a.readyState >= 1) { resolve(a.duration); return; }
            a.addEventListener('loadedmetadata', () => resolve(a.duration));
            a.addEventListener('error', () => reject(new Error('audio error ' + (a.error && a.error.code))));
            a.load();
        })"""
    )
    assert 0 < duration < 30
    played = audio.evaluate("a => a.play().then(() => new Promise(r => setTimeout(r, 300))).then(() => a.currentTime)")
    assert played > 0  # it actually plays
    fetched = page.evaluate("src => fetch(src).then(r => r.arrayBuffer()).then(b => b.byteLength)", source)
    assert fetched > 44
    assert page.get_by_text("Audio").first.is_visible() and page.get_by_text("Latency").first.is_visible()

    screenshot = tmp_path / "streamlit-demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
