"""Time one synthesize request and N concurrent ones against a running service, side by side.

    python scripts/measure_requests.py --url http://127.0.0.1:8000 --concurrency 8

Warms BentoML's batching dispatcher first (it calibrates on its first ~11 calls, one at a time), then
alternates sequential and concurrent rounds so machine noise hits both alike, and prints medians, the
batch sizes the server reported (X-TTS-Batch-Size) and the throughput ratio concurrent / sequential.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

SPEAKERS = ["Ryan", "Vivian", "Eric", "Sohee", "Aiden", "Serena", "Dylan", "Ono_Anna"]


async def one(http: httpx.AsyncClient, text: str, speaker: str) -> tuple[float, int, float]:
    started = time.perf_counter()
    response = await http.post("/v1/tts/synthesize", json={"text": text, "speaker": speaker})
    response.raise_for_status()
    return (
        time.perf_counter() - started,
        int(response.headers["x-tts-batch-size"]),
        float(response.headers["x-tts-audio-seconds"]),
    )


async def measure(url: str, concurrency: int, rounds: int, text: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for i in range(12):
            await one(http, f"Warm up {i}.", "Ryan")
        single_latency, burst_wall, burst_latency, batch_sizes, audio = [], [], [], [], []
        for _ in range(rounds):
            for i in range(concurrency):  # the same texts, one after another
                latency, _, seconds = await one(http, text, SPEAKERS[i % len(SPEAKERS)])
                single_latency.append(latency)
            started = time.perf_counter()
            results = await asyncio.gather(*[one(http, text, SPEAKERS[i % len(SPEAKERS)]) for i in range(concurrency)])
            burst_wall.append(time.perf_counter() - started)
            burst_latency += [r[0] for r in results]
            batch_sizes += [r[1] for r in results]
            audio += [r[2] for r in results]
    single = statistics.median(single_latency)
    wall = statistics.median(burst_wall)
    print(f"server: {url}   text: {text!r}   rounds: {rounds}")
    print(f"audio per request (s):               {statistics.median(audio):.2f}")
    print(f"single request latency, median (s):  {single:.3f}")
    print(f"{concurrency} concurrent: wall, median (s):     {wall:.3f}")
    p50, worst = statistics.median(burst_latency), max(burst_latency)
    print(f"{concurrency} concurrent: latency p50/max (s):  {p50:.3f} / {worst:.3f}")
    print(f"batch sizes reported:                {sorted(set(batch_sizes))} (per request: {batch_sizes})")
    print(f"throughput ratio concurrent/sequential: {concurrency * single / wall:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text", default="Welcome to the virtual gallery, please follow me.")
    args = parser.parse_args()
    asyncio.run(measure(args.url, args.concurrency, args.rounds, args.text))


if __name__ == "__main__":
    main()
