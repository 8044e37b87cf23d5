"""Sustained concurrent load through the live service: nothing accepted may fail.

Regression test for BentoML 1.4.39 recycling its inter-service session every 100 calls and aborting
the calls in flight (500s; see tts_service/bentoml_fixes.py). 120 calls from 4 clients cross that mark.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.conftest import LiveServer


def test_120_calls_from_4_clients_all_succeed(server: LiveServer) -> None:
    statuses: Counter[int] = Counter()
    bodies: list[str] = []

    async def client(http: httpx.AsyncClient, worker: int) -> None:
        for i in range(30):
            route, body = (
                ("/v1/tts/synthesize", {"text": f"Hi {i}.", "speaker": "Ryan"})
                if (i + worker) % 2
                else (
                    "/v1/audio/speech",
                    {"model": "tts-1", "voice": "nova", "input": f"Hi {i}.", "response_format": "wav"},
                )
            )
            response = await http.post(route, json=body)
            statuses[response.status_code] += 1
            if response.status_code != 200:
                bodies.append(response.text[:200])

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            await asyncio.gather(*[client(http, w) for w in range(4)])

    asyncio.run(run())
    assert statuses == {200: 120}, (statuses, bodies[:3])
    assert "ServerDisconnectedError" not in server.log()
