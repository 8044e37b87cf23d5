"""End to end in headless Chromium: the Streamlit demo, served by `streamlit run`, against `bentoml serve`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page

from tests.conftest import REPO_ROOT, LiveServer, free_port
from tests.test_voices_http import reference_wav


@contextmanager
def streamlit_for(service_url: str, log_dir: Path) -> Iterator[str]:
    """`streamlit run` of the demo against `service_url`; yields the demo's URL."""
    port = free_port()
    log_path = log_dir / "streamlit.log"
    env = {**os.environ, "TTS_API_URL": service_url, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
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


def settled(page: Page) -> None:
    """Wait until no script run is in progress (the app root's `data-test-script-state`, which Streamlit's
    own browser tests wait on too)."""
    idle = page.locator("[data-testid='stApp'][data-test-script-state='notRunning']")
    idle.wait_for(state="attached", timeout=120_000)


@pytest.fixture(scope="module")
def streamlit_url(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with streamlit_for(server.url, tmp_path_factory.mktemp("streamlit")) as url:
        yield url


@pytest.fixture(scope="module")
def studio_streamlit_url(studio: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with streamlit_for(studio.url, tmp_path_factory.mktemp("streamlit-studio")) as url:
        yield url


PLAYS = "a => a.play().then(() => new Promise(r => setTimeout(r, 300))).then(() => a.currentTime)"
DURATION = """a => new Promise((resolve, reject) => {
    if (a.readyState >= 1) { resolve(a.duration); return; }
    a.addEventListener('loadedmetadata', () => resolve(a.duration));
    a.addEventListener('error', () => reject(new Error('audio error ' + (a.error && a.error.code))));
    a.load();
})"""


def test_pick_a_speaker_type_text_synthesize_and_play(page: Page, streamlit_url: str, tmp_path: Path) -> None:
    page.goto(streamlit_url)
    page.get_by_text("Model loaded and ready").wait_for(timeout=60_000)
    settled(page)

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
    assert 0 < audio.evaluate(DURATION) < 30
    assert audio.evaluate(PLAYS) > 0  # it actually plays
    fetched = page.evaluate("src => fetch(src).then(r => r.arrayBuffer()).then(b => b.byteLength)", source)
    assert fetched > 44
    assert page.get_by_text("Audio").first.is_visible() and page.get_by_text("Latency").first.is_visible()

    screenshot = tmp_path / "streamlit-demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def test_voices_page_designs_and_clones_voices_that_then_speak_and_stream(
    page: Page, studio_streamlit_url: str, tmp_path: Path
) -> None:
    page.goto(studio_streamlit_url)
    page.get_by_text("Model loaded and ready").wait_for(timeout=60_000)
    settled(page)
    page.get_by_role("tab", name="Voices").click()

    page.get_by_label("Designed voice name").fill("ui-robot")
    page.get_by_label("Description").fill("A small friendly robot with a metallic voice.")
    page.get_by_role("button", name="Design voice").click()
    page.get_by_text("Saved voice ui-robot").wait_for(timeout=120_000)
    settled(page)
    preview = page.locator("audio:visible").first
    assert 0 < preview.evaluate(DURATION) < 30 and preview.evaluate(PLAYS) > 0  # the designed line plays

    clip = tmp_path / "companion.wav"
    clip.write_bytes(reference_wav())
    page.get_by_label("Cloned voice name").fill("ui-companion")
    page.locator("input[type=file]").first.set_input_files(str(clip))
    page.get_by_label("What the clip says").fill("Ahoy there, welcome aboard.")
    page.get_by_role("button", name="Clone voice").click()
    page.get_by_text("Saved voice ui-companion").wait_for(timeout=120_000)
    settled(page)
    page.get_by_text("ui-companion — cloned voice").first.wait_for()

    page.get_by_role("tab", name="Speak").click()  # the new voices are in the speaker list
    page.get_by_role("combobox", name="Speaker").first.click()
    page.get_by_role("option", name="ui-robot").click()
    page.get_by_label("Text").fill("Beep boop, hello traveller.")
    page.get_by_role("button", name="Synthesize").click()
    page.get_by_text("Latest: ui-robot (auto)").wait_for(timeout=120_000)
    settled(page)
    spoken = page.locator("audio:visible").first
    assert 0 < spoken.evaluate(DURATION) < 30 and spoken.evaluate(PLAYS) > 0

    page.get_by_text("Stream: play as it arrives").click()
    page.get_by_role("button", name="Synthesize").click()
    stream = page.locator("audio.tts-stream")
    stream.wait_for(state="attached", timeout=60_000)
    source = stream.get_attribute("src")
    assert source and "/v1/tts/stream?" in source and "speaker=ui-robot" in source
    assert stream.evaluate(PLAYS) > 0  # the browser plays the stream as it arrives

    settled(page)  # Streamlit drops a click that lands while the app reruns (the stream's run, on a loaded machine)
    page.get_by_role("tab", name="Voices").click()
    companion = page.get_by_test_id("stExpander").filter(has_text="ui-companion — cloned voice")
    companion.get_by_text("ui-companion — cloned voice").click()
    companion.get_by_role("button", name="Delete").click()  # this voice's button, not the first on the page
    companion.wait_for(state="detached", timeout=60_000)
    page.get_by_text("ui-robot — designed voice").first.wait_for()  # the other voice is still there
    screenshot = tmp_path / "voices-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
