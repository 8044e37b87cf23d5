"""The service under the three loads wave 2 is judged by, against a running server:

1. 8 whole-file requests of different lengths and speakers sent together, against the same 8 sent one
   after another: the audio rate of each (audio seconds per wall second) and their ratio;
2. a lone request's latency before and after a burst of 16 clients: their ratio (does it recover?);
3. one stream while 8 whole-file requests run: its longest gap between received chunks against the audio
   it had in hand (a player starting at the first byte must never run dry).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import environment, served

SYNTH = "/v1/tts/synthesize"
LINES = [
    ("Welcome aboard.", "Ryan", "english"),
    ("The museum opens at nine and closes at six every day except Monday.", "Vivian", "english"),
    ("これは日本語のテキストです。", "Ono_Anna", "japanese"),
    ("Please keep your hands inside the vehicle at all times and enjoy the ride.", "Serena", "english"),
    ("The next exhibit is just around the corner, past the fountain.", "Aiden", "english"),
    ("你好，欢迎来到虚拟画廊。", "Eric", "chinese"),
    ("Would you like to hear the story of this painting?", "Sohee", "korean"),
    ("One two three four five six seven eight nine ten eleven twelve thirteen fourteen.", "Uncle_Fu", "english"),
]
STREAM_BODY = {
    "text": "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen.",
    "speaker": "Ryan",
    "language": "english",
    "format": "pcm",
}
BYTES_PER_SECOND = 2 * 24000


def _body(line: tuple[str, str, str], seeded: bool = False) -> dict[str, Any]:
    """A line's request; `seeded` (for a sampling server): each line with its own fixed seed, so that
    every run, and every server, generates the same audio."""
    body: dict[str, Any] = {"text": line[0], "speaker": line[1], "language": line[2]}
    return {**body, "seed": 100 + LINES.index(line)} if seeded else body


async def _one(http: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(seconds, audio seconds, batch size) of one whole-file request."""
    started = time.perf_counter()
    response = await http.post(SYNTH, json=body)
    response.raise_for_status()
    return (
        time.perf_counter() - started,
        float(response.headers["x-tts-audio-seconds"]),
        int(response.headers["x-tts-batch-size"]),
    )


async def together_vs_one_by_one(url: str, seeded: bool = False) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        started = time.perf_counter()
        sequential = [await _one(http, _body(line, seeded)) for line in LINES]
        sequential_s = time.perf_counter() - started
        started = time.perf_counter()
        together = await asyncio.gather(*[_one(http, _body(line, seeded)) for line in LINES])
        together_s = time.perf_counter() - started
    audio = sum(item[1] for item in together)
    return {
        "audio_s": audio,
        "one_by_one_s": sequential_s,
        "together_s": together_s,
        "one_by_one_rate": sum(item[1] for item in sequential) / sequential_s,
        "together_rate": audio / together_s,
        "largest_batch": max(item[2] for item in together),
    }


async def lone_after_burst(url: str, seeded: bool = False, clients: int = 16, per_client: int = 2) -> dict[str, Any]:
    body = _body(LINES[0], seeded)

    async def lone(http: httpx.AsyncClient) -> float:
        times = [(await _one(http, body))[0] for _ in range(5)]
        return statistics.median(times)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as http:
        before = await lone(http)

        async def client(index: int) -> None:
            for k in range(per_client):
                await _one(http, _body(LINES[(index + k) % len(LINES)], seeded))

        started = time.perf_counter()
        await asyncio.gather(*[client(i) for i in range(clients)])
        burst_s = time.perf_counter() - started
        after = await lone(http)
    return {"before_s": before, "after_s": after, "ratio": after / before, "burst_s": burst_s}


async def stream_gaps_under_load(url: str, seeded: bool = False, files: int = 8) -> dict[str, Any]:
    arrivals: list[tuple[float, int]] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=files + 2)) as http:

        async def stream() -> None:
            body = {**STREAM_BODY, "seed": 99} if seeded else STREAM_BODY
            async with http.stream("POST", "/v1/tts/stream", json=body) as response:
                response.raise_for_status()
                async for data in response.aiter_raw():
                    if data:
                        arrivals.append((time.perf_counter(), len(data)))

        load = [_one(http, _body(LINES[i % len(LINES)] if i % 2 else LINES[7], seeded)) for i in range(files)]
        await asyncio.gather(stream(), *load)
    # The network splits an engine chunk into pieces; pieces less than 30 ms apart are one chunk.
    chunks: list[list[float]] = []  # [arrival of its first piece, bytes]
    for t, size in arrivals:
        if chunks and t - chunks[-1][2] < 0.03:
            chunks[-1][1] += size
            chunks[-1][2] = t
        else:
            chunks.append([t, size, t])
    first = chunks[0][0]
    received = 0
    worst_margin = float("inf")  # audio in hand minus playback time, just before each chunk arrives
    longest_gap = 0.0
    gap_vs_previous = 0.0  # the longest gap over the audio of the chunk that came before it
    for (t_prev, size_prev, _), (t, _size, _) in zip(chunks, chunks[1:], strict=False):
        received += size_prev
        gap = t - t_prev
        longest_gap = max(longest_gap, gap)
        gap_vs_previous = max(gap_vs_previous, gap / (size_prev / BYTES_PER_SECOND))
        worst_margin = min(worst_margin, received / BYTES_PER_SECOND - (t - first))
    return {
        "pieces": len(chunks),
        "audio_s": sum(size for _, size in arrivals) / BYTES_PER_SECOND,
        "longest_gap_s": longest_gap,
        "longest_gap_vs_previous_audio": gap_vs_previous,
        "worst_playback_margin_s": worst_margin,
    }


def measure_burst(url: str, repeat: int, seeded: bool = False) -> dict[str, Any]:
    asyncio.run(together_vs_one_by_one(url, seeded))  # warm-up
    runs = [asyncio.run(together_vs_one_by_one(url, seeded)) for _ in range(repeat)]
    ratio = statistics.median(r["together_rate"] / r["one_by_one_rate"] for r in runs)
    return {
        "together": runs,
        "together_vs_one_by_one": ratio,
        "after_burst": asyncio.run(lone_after_burst(url, seeded)),
        "stream_under_load": [asyncio.run(stream_gaps_under_load(url, seeded)) for _ in range(repeat)],
    }


def burst_table(result: dict[str, Any], label: str) -> str:
    lines: list[str] = []
    emit = lines.append
    emit(f"\n## Bursts: {label}\n")
    emit("### 8 whole-file requests of different lengths and speakers: together vs one after another\n")
    emit("| run | audio s | one by one s | together s | one-by-one audio s/s | together audio s/s | ratio | batch |")
    emit("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(result["together"], 1):
        emit(
            f"| {i} | {r['audio_s']:.1f} | {r['one_by_one_s']:.2f} | {r['together_s']:.2f} "
            f"| {r['one_by_one_rate']:.2f} | {r['together_rate']:.2f} "
            f"| {r['together_rate'] / r['one_by_one_rate']:.2f}x | {r['largest_batch']} |"
        )
    emit(f"\nMedian ratio: **{result['together_vs_one_by_one']:.2f}x** (goal: at least 2.5x)\n")
    b = result["after_burst"]
    emit("### A lone request before and after a 16-client burst (median of 5 each)\n")
    emit("| before ms | burst s | after ms | after / before |")
    emit("| ---: | ---: | ---: | ---: |")
    emit(f"| {b['before_s'] * 1000:.0f} | {b['burst_s']:.1f} | {b['after_s'] * 1000:.0f} | {b['ratio']:.2f}x |")
    emit("\n(goal: at most 1.3x)\n")
    emit("### One stream while 8 whole-file requests run\n")
    emit(
        "| run | chunks | audio s | longest gap s | longest gap / audio of the chunk before it "
        "| worst playback margin s |"
    )
    emit("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(result["stream_under_load"], 1):
        emit(
            f"| {i} | {r['pieces']} | {r['audio_s']:.2f} | {r['longest_gap_s']:.3f} | "
            f"{r['longest_gap_vs_previous_audio']:.2f} | {r['worst_playback_margin_s']:.3f} |"
        )
    emit("\n(goal: no gap longer than the audio of the chunk before it, i.e. ratio at most 1; a positive margin")
    emit("means a player that starts at the first byte never runs dry)")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Against --url, or a server started here with --max-batch-size slots."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            result = measure_burst(args.url, args.repeat, args.sampling)
        else:
            with served(args, args.max_batch_size, Path(tmp)) as url:
                result = measure_burst(url, args.repeat, args.sampling)
    target = args.url or args.model
    label = f"{target}, sampled with fixed seeds" if args.sampling else f"{target}, greedy"
    return {"kind": "burst", "target": target, "label": label, "env": environment(), **result}


def report(result: dict[str, Any]) -> str:
    return burst_table(result, result.get("label", result["target"]))
