"""The HTTP service under load, with its KV slots against one slot (batching off), and its overhead."""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import SERVICE_TEXTS, VOICES, environment, resolve_model, served, table
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.settings import Settings

logger = logging.getLogger("bench")


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    failures: int = 0
    failure_examples: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def audio_per_s(self) -> float:
        return self.audio_s / self.wall_s

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def drive(url: str, concurrency: int, total: int) -> LoadResult:
    """`concurrency` clients send `total` requests between them, each waiting for its answer."""
    result = LoadResult(concurrency, total, 0.0)
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for index in counter:
            body = {"text": SERVICE_TEXTS[index % len(SERVICE_TEXTS)], "speaker": VOICES[index % 4][0]}
            started = time.perf_counter()
            response = await http.post("/v1/tts/synthesize", json=body)
            result.latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                result.failures += 1
                if len(result.failure_examples) < 3:
                    result.failure_examples.append(f"{response.status_code}: {response.text[:200]}")
                continue
            result.audio_s += float(response.headers["x-tts-audio-seconds"])
            result.batch_sizes.append(int(response.headers["x-tts-batch-size"]))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        result.wall_s = time.perf_counter() - started
    return result


def warm_up(url: str, count: int = 12) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        for i in range(count):
            http.post("/v1/tts/synthesize", json={"text": SERVICE_TEXTS[i % 4], "speaker": "ryan"}).raise_for_status()


def lone_latency(url: str, repeat: int = 5) -> float:
    """Median latency of one request at a time (the same greedy request each time)."""
    text, (speaker, language) = SERVICE_TEXTS[0], VOICES[0]
    times = []
    with httpx.Client(base_url=url, timeout=600) as http:
        for _ in range(repeat):
            started = time.perf_counter()
            http.post("/v1/tts/synthesize", json={"text": text, "speaker": speaker, "language": language})
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def engine_latency(args: argparse.Namespace, repeat: int = 5) -> float:
    """Median in-process engine time for the request lone_latency sends."""
    text, (speaker, language) = SERVICE_TEXTS[0], VOICES[0]
    settings = Settings(model=resolve_model(args), device=args.device, cache_dir=args.cache_dir, greedy=True)
    engine = TTSEngine.load(settings)
    request = SynthesisRequest(text, speaker, language, "")
    engine.synthesize(request)
    engine_times = []
    for _ in range(repeat):
        started = time.perf_counter()
        engine.synthesize(request)
        engine_times.append(time.perf_counter() - started)
    return statistics.median(engine_times)


def series(url: str, levels: list[int], total: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One server's run: the load levels, and lone latency (ms) after warm-up and after the load."""
    warm_up(url)
    before = lone_latency(url)
    results = [asdict(asyncio.run(drive(url, level, max(total, level)))) for level in levels]
    return results, {"before": before * 1000, "after": lone_latency(url) * 1000}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"kind": "service", "env": environment(), "target": args.url or args.model}
    result["requests"], result["max_batch_size"] = args.requests, None if args.url else args.max_batch_size
    result["lone_ms"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            result["batched"], result["lone_ms"]["batching on"] = series(args.url, args.concurrency, args.requests)
        else:
            with served(args, args.max_batch_size, Path(tmp)) as url:
                result["batched"], result["lone_ms"]["batching on"] = series(url, args.concurrency, args.requests)
            with served(args, 1, Path(tmp)) as url:
                result["unbatched"], result["lone_ms"]["batching off"] = series(url, args.concurrency, args.requests)
    result["engine_ms"] = engine_latency(args) * 1000
    return result


def _levels(levels: list[dict[str, Any]]) -> list[LoadResult]:
    return [LoadResult(**level) for level in levels]


def _load_table(title: str, results: list[LoadResult]) -> str:
    for r in results:
        for example in r.failure_examples:
            logger.warning("failed request at %d clients: %s", r.concurrency, example)
    headers = [
        "clients",
        "requests",
        "failed",
        "req/s",
        "audio s/s",
        "p50 s",
        "p95 s",
        "p99 s",
        "mean batch",
        "max batch",
    ]
    rows = [
        (
            r.concurrency,
            r.requests,
            r.failures,
            f"{r.rps:.2f}",
            f"{r.audio_per_s:.2f}",
            f"{r.pct(0.5):.3f}",
            f"{r.pct(0.95):.3f}",
            f"{r.pct(0.99):.3f}",
            f"{statistics.mean(r.batch_sizes or [0]):.2f}",
            max(r.batch_sizes or [0]),
        )
        for r in results
    ]
    return f"\n### {title}\n\n" + table(headers, rows)


def report(result: dict[str, Any]) -> str:
    batched = _levels(result["batched"])
    slots = result["max_batch_size"] or "as configured"
    parts = [f"\n## Service: {result['target']}, greedy, {result['requests']} requests per level"]
    parts.append(_load_table(f"Batching on (max batch {slots})", batched))
    if "unbatched" in result:
        unbatched = _levels(result["unbatched"])
        parts.append(_load_table("Batching off (TTS_MAX_BATCH_SIZE=1)", unbatched))
        ratios = [
            (
                on.concurrency,
                f"{on.rps / off.rps:.2f}x",
                f"{on.audio_per_s / off.audio_per_s:.2f}x",
                f"{on.pct(0.5) / off.pct(0.5):.2f}x",
            )
            for on, off in zip(batched, unbatched, strict=True)
        ]
        parts.append(
            "\n### Throughput ratio, batching on / off, same load\n\n"
            + table(["clients", "req/s ratio", "audio s/s ratio", "p50 latency ratio"], ratios)
        )
    engine_ms = result["engine_ms"]
    lone = [
        (name, f"{ms['before']:.1f}", f"{ms['before'] - engine_ms:.1f}", f"{ms['after']:.1f}")
        for name, ms in result["lone_ms"].items()
    ]
    parts.append(
        "\n### One request at a time (same greedy request, median of 5), and the HTTP overhead\n\n"
        f"In-process engine time for this request: {engine_ms:.1f} ms.\n\n"
        + table(
            ["server", "after warm-up ms", "overhead vs engine ms", "after the load above ms"],
            lone,
            align_first_left=True,
        )
    )
    return "\n".join(parts)
