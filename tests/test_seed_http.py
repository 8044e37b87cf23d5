"""Seeds over HTTP, on a server that samples (qwen-tts's own settings, not greedy): a line replays byte
for byte with its seed, whoever else is speaking; a bad seed is a 400 that names `seed`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, running_server

SYNTH, STREAM, SPEECH = "/v1/tts/synthesize", "/v1/tts/stream", "/v1/audio/speech"
LINE = {"text": "The harbour master raises his lantern.", "speaker": "Uncle_Fu", "language": "english"}


@pytest.fixture(scope="module")
def sampling_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"TTS_MODEL": "tiny", "TTS_CACHE_DIR": str(cache_dir), "TTS_GREEDY": "false"}
    with running_server(env, tmp_path_factory.mktemp("sampling") / "serve.log") as live:
        yield live


def test_a_seed_replays_the_same_bytes_alone_and_among_others(sampling_server: LiveServer) -> None:
    async def run() -> tuple[httpx.Response, list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=sampling_server.url, timeout=120) as http:
            alone = await http.post(SYNTH, json={**LINE, "seed": 77})
            crowd = await asyncio.gather(
                http.post(SYNTH, json={**LINE, "seed": 77}),
                *[http.post(SYNTH, json={"text": f"Someone else, line {i}.", "speaker": "Ryan"}) for i in range(4)],
            )
            other_seed = await http.post(SYNTH, json={**LINE, "seed": 78})
            streamed = await http.post(STREAM, json={**LINE, "seed": 77, "format": "wav"})
            return alone, crowd, other_seed, streamed

    alone, crowd, other_seed, streamed = asyncio.run(run())
    assert alone.status_code == crowd[0].status_code == 200 and alone.headers["x-tts-seed"] == "77"
    assert int(crowd[0].headers["x-tts-batch-size"]) >= 2  # it shared its steps with the others
    assert crowd[0].content == alone.content
    assert other_seed.status_code == 200 and other_seed.content != alone.content
    assert streamed.headers["x-tts-seed"] == "77"


def test_without_a_seed_the_one_used_is_returned_and_replays(sampling_server: LiveServer) -> None:
    with httpx.Client(base_url=sampling_server.url, timeout=120) as http:
        first = http.post(SYNTH, json=LINE)
        seed = int(first.headers["x-tts-seed"])
        again = http.post(SYNTH, json={**LINE, "seed": seed})
        fresh = http.post(SYNTH, json=LINE)
    assert again.content == first.content
    assert fresh.headers["x-tts-seed"] != first.headers["x-tts-seed"]


@pytest.mark.parametrize("seed", [1.5, "abc", True, -1, 2**63, None])
def test_a_bad_seed_is_a_400_naming_seed(sampling_server: LiveServer, seed: object) -> None:
    with httpx.Client(base_url=sampling_server.url, timeout=60) as http:
        plain = http.post(SYNTH, json={**LINE, "seed": seed})
        stream = http.post(STREAM, json={**LINE, "seed": seed})
        openai = http.post(SPEECH, json={"model": "tts-1", "input": "Hi.", "voice": "Ryan", "seed": seed})
        query = http.get(STREAM, params={**LINE, "seed": str(seed)}) if isinstance(seed, (float, str)) else None
    for response in (plain, stream):
        assert response.status_code == 400, response.text
        assert any(detail["loc"][-1] == "seed" for detail in response.json()["detail"]), response.text
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "seed", openai.text
    if query is not None:
        assert query.status_code == 400 and "seed" in query.text
