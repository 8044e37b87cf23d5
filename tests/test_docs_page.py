"""The API page at `/`, in headless Chromium: this product's title and tags, no request leaves the
server, and Swagger's "Try it out" on the WAV route works as shipped."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from playwright.sync_api import Page

from tests.conftest import LiveServer


def test_the_api_page_speaks_for_the_product_and_try_it_out_works(
    page: Page, server: LiveServer, tmp_path: Path
) -> None:
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urlparse(request.url).netloc))
    page.goto(server.url + "/")
    page.get_by_role("heading", name="Qwen3-TTS service").wait_for(timeout=30_000)
    header = page.locator(".information-container").inner_text()
    assert "Quick start" in header and "0.1.0" in header
    assert "BentoML" not in header and "Slack" not in header and "None" not in header
    for tag in ("speech", "streaming", "OpenAI-compatible", "service information"):
        assert page.locator(f"#operations-tag-{tag.replace(' ', '_')}").count() == 1, tag

    page.locator("#operations-speech-qwen3_tts__synthesize").click()
    page.get_by_role("button", name="Try it out").click()
    body = page.locator("#operations-speech-qwen3_tts__synthesize textarea.body-param__text").input_value()
    assert '"speaker": "Ryan"' in body and '"text": "Welcome to the gallery."' in body
    page.get_by_role("button", name="Execute").click()
    status = page.locator(
        "#operations-speech-qwen3_tts__synthesize .live-responses-table tbody .response-col_status"
    ).first
    status.wait_for(timeout=60_000)
    assert status.inner_text().strip() == "200"

    screenshot = Path(os.environ.get("TTS_DOCS_SCREENSHOT", tmp_path / "api-page.png"))
    page.screenshot(path=str(screenshot), full_page=False)
    assert screenshot.stat().st_size > 10_000
    assert hosts == {urlparse(server.url).netloc}, hosts  # nothing loaded from elsewhere
