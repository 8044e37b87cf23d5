"""Clients that hang up mid-request must not crash a worker or spoil the batch they were part of."""

from __future__ import annotations

import asyncio

import httpx
import psutil

from tests.conftest import LiveServer

SYNTH = "/v1/tts/synthesize"


def test_dropped_clients_do_not_poison_their_batch(server: LiveServer) -> None:
    workers_before = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}

    async def run() -> tuple[list[BaseException | httpx.Response], list[httpx.Response]]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=0.05) as impatient,
            httpx.AsyncClient(base_url=server.url, timeout=120) as patient,
        ):
            body = {
                "text": "A fairly long sentence so that the batch is still running when some leave.",
                "speaker": "Ryan",
            }
            dropped = [impatient.post(SYNTH, json=body) for _ in range(3)]
            kept = [patient.post(SYNTH, json={**body, "speaker": s}) for s in ("Aiden", "Vivian", "Sohee", "Eric")]
            results = await asyncio.gather(*dropped, *kept, return_exceptions=True)
            return list(results[:3]), list(results[3:])

    for _ in range(3):
        dropped, kept = asyncio.run(run())
        assert all(isinstance(r, httpx.TimeoutException) for r in dropped), dropped
        for response in kept:
            assert isinstance(response, httpx.Response), response
            assert response.status_code == 200 and response.content[:4] == b"RIFF"
    assert server.process.poll() is None
    assert {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)} == workers_before
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
