"""TTS_MAX_BATCH_SIZE=1: one KV slot, so concurrent requests take turns, one per step batch, and all succeed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server, stop_server, wait_ready


@pytest.fixture(scope="module")
def unbatched_url(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {"TTS_MODEL": "tiny", "TTS_CACHE_DIR": str(cache_dir), "TTS_GREEDY": "true", "TTS_MAX_BATCH_SIZE": "1"}
    server = start_server(env, tmp_path_factory.mktemp("unbatched") / "serve.log")
    try:
        wait_ready(server)
        yield server.url
    finally:
        stop_server(server)


def test_concurrent_requests_run_one_at_a_time(unbatched_url: str) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=unbatched_url, timeout=120) as http:
            return await asyncio.gather(
                *[http.post("/v1/tts/synthesize", json={"text": f"Number {i}.", "speaker": "Ryan"}) for i in range(4)]
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.headers["x-tts-batch-size"] for r in responses] == ["1"] * 4
    assert all(r.headers["content-type"] == "audio/wav" for r in responses)
