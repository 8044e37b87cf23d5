"""Time to first audio and whole-utterance time, streamed against not streamed, at each concurrency:
in-process on the engine, or over HTTP against a running service (`--url`)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from typing import Any

import httpx

from benchmarks.common import (
    FRAME_BYTES,
    audio_seconds,
    engine_batch,
    environment,
    eos_suppressed,
    load_bench_engine,
    long_requests,
    model_label,
    sync,
    table,
)
from tts_service.engine import SynthesisRequest

# Requests for `stream --url`. A server cannot be told to skip end-of-speech, so these were chosen for
# their lengths under greedy decoding on the tiny checkpoint: 125, 48, 45 and 8 frames.
HTTP_STREAM_BODIES: list[dict[str, str]] = [
    {
        "text": "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen.",
        "speaker": "ryan",
        "language": "english",
    },
    {
        "text": "The museum opens at nine and closes at six every day except Monday, when it is closed for cleaning.",
        "speaker": "ryan",
        "language": "english",
    },
    {"text": "これは日本語のテキストです。", "speaker": "vivian", "language": "auto"},
    {
        "text": "Please keep your hands inside the vehicle at all times and enjoy the ride through the ancient forest.",
        "speaker": "vivian",
        "language": "english",
        "instruct": "Speak happily",
    },
]


def _ratios(row: dict[str, Any]) -> dict[str, Any]:
    row["ttfa_vs_whole"] = row["ttfa_ms"] / 1000 / row["whole_s"]
    row["total_vs_whole"] = row["stream_total_s"] / row["whole_s"]
    return row


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In-process: all streams submitted at once against the same requests as one non-streamed batch."""
    if args.url:
        return measure_http(args)
    engine = load_bench_engine(args)
    device = str(engine.model.device)
    frames = args.frames

    def streamed(batch: list[SynthesisRequest]) -> tuple[list[float], list[float]]:
        """Per stream: first chunk and last chunk times."""
        first: list[float] = [0.0] * len(batch)
        last: list[float] = [0.0] * len(batch)
        sync(device)
        started = time.perf_counter()
        handles = [engine.submit(r, f"bench-{i}-{time.monotonic_ns()}") for i, r in enumerate(batch)]

        def drain(index: int) -> None:
            for n, _chunk in enumerate(handles[index]):
                if n == 0:
                    first[index] = time.perf_counter() - started
            last[index] = time.perf_counter() - started

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(batch))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if {h.end.frames for h in handles} != {frames}:
            raise RuntimeError(f"expected {frames} frames per stream, got {sorted(h.end.frames for h in handles)}")
        return first, last

    def whole(batch: list[SynthesisRequest]) -> float:
        sync(device)
        started = time.perf_counter()
        engine_batch(engine, batch)
        sync(device)
        return time.perf_counter() - started

    rows = []
    with eos_suppressed(engine):
        streamed(long_requests(1))  # warm-up
        whole(long_requests(1))
        for count in args.concurrency:
            batch = long_requests(count)
            ttfa, done, whole_s = [], [], []
            for _ in range(args.repeat):  # interleaved, so drift hits both alike
                first, last = streamed(batch)
                ttfa.append(statistics.median(first))
                done.append(max(last))
                whole_s.append(whole(batch))
            row = {
                "streams": count,
                "frames": frames,
                "ttfa_ms": statistics.median(ttfa) * 1000,
                "stream_total_s": statistics.median(done),
                "whole_s": statistics.median(whole_s),
            }
            row["stream_rtf"] = count * audio_seconds(frames) / row["stream_total_s"]
            rows.append(_ratios(row))
    return {
        "kind": "stream",
        "environment": environment(),
        "model": model_label(args),
        "device": device,
        "dtype": str(engine.model.model.dtype),
        "frames": frames,
        "plan": [args.first_frames, args.chunk_frames, args.left_context],
        "repeat": args.repeat,
        "rows": rows,
    }


async def _http_round(url: str, count: int) -> tuple[list[float], list[float], list[float], int, int]:
    """`count` streams at once, then the same requests at once on /v1/tts/synthesize. Per request:
    first byte and end of the stream, end of the whole file; and the audio frames of both (equal when
    the server decodes greedily, TTS_GREEDY=true)."""
    bodies = [HTTP_STREAM_BODIES[i % len(HTTP_STREAM_BODIES)] for i in range(count)]
    first, last, whole = [0.0] * count, [0.0] * count, [0.0] * count
    frames, whole_frames = [0] * count, [0] * count
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=count + 2)) as http:

        async def one_stream(index: int, started: float) -> None:
            size = 0
            async with http.stream("POST", "/v1/tts/stream", json={**bodies[index], "format": "pcm"}) as response:
                response.raise_for_status()
                async for chunk in response.aiter_raw():
                    if size == 0 and chunk:
                        first[index] = time.perf_counter() - started
                    size += len(chunk)
            last[index] = time.perf_counter() - started
            frames[index] = size // FRAME_BYTES

        async def one_whole(index: int, started: float) -> None:
            response = await http.post("/v1/tts/synthesize", json={**bodies[index], "format": "pcm"})
            response.raise_for_status()
            whole[index] = time.perf_counter() - started
            whole_frames[index] = len(response.content) // FRAME_BYTES

        started = time.perf_counter()
        await asyncio.gather(*[one_stream(i, started) for i in range(count)])
        started = time.perf_counter()
        await asyncio.gather(*[one_whole(i, started) for i in range(count)])
    return first, last, whole, sum(frames), sum(whole_frames)


def measure_http(args: argparse.Namespace) -> dict[str, Any]:
    """Over HTTP: first byte of /v1/tts/stream against the answer of /v1/tts/synthesize, for the same
    requests sent at the same concurrency."""
    rows = []
    asyncio.run(_http_round(args.url, 1))  # warm-up
    for count in args.concurrency:
        ttfa, done, whole, audio, whole_audio = [], [], [], [], []
        for _ in range(args.repeat):
            first, last, whole_s, frames, whole_frames = asyncio.run(_http_round(args.url, count))
            ttfa.append(statistics.median(first))
            done.append(max(last))
            whole.append(max(whole_s))
            audio.append(audio_seconds(frames))
            whole_audio.append(audio_seconds(whole_frames))
        row = {
            "streams": count,
            "ttfa_ms": statistics.median(ttfa) * 1000,
            "stream_total_s": statistics.median(done),
            "whole_s": statistics.median(whole),
            "stream_audio_s": statistics.median(audio),
            "whole_audio_s": statistics.median(whole_audio),
        }
        row["stream_rtf"] = row["stream_audio_s"] / row["stream_total_s"]
        rows.append(_ratios(row))
    return {"kind": "stream_http", "environment": environment(), "url": args.url, "repeat": args.repeat, "rows": rows}


def _cells(r: dict[str, Any]) -> list[Any]:
    """The columns both tables share: streams, TTFA, streamed total, whole, and their ratios."""
    return [
        r["streams"],
        f"{r['ttfa_ms']:.0f}",
        f"{r['stream_total_s']:.2f}",
        f"{r['whole_s']:.2f}",
        f"{r['ttfa_vs_whole']:.3f}",
        f"{r['total_vs_whole']:.2f}",
    ]


def report(result: dict[str, Any]) -> str:
    if result["kind"] == "stream_http":
        return report_http(result)
    frames, (first, chunk, context) = result["frames"], result["plan"]
    rows = [[*_cells(r), f"{r['stream_rtf']:.2f}"] for r in result["rows"]]
    headers = [
        "streams",
        "TTFA ms",
        "streamed total s",
        "whole (not streamed) s",
        "TTFA / whole",
        "total / whole",
        "RTF",
    ]
    return (
        f"\n## Streaming: {result['model']}, {frames} frames ({audio_seconds(frames):.1f} s audio) per stream, "
        f"{result['dtype']} on {result['device']}, chunks {first} then {chunk} frames, left context {context}, "
        f"median of {result['repeat']}\n\n"
        "TTFA = time to the first audio chunk (median over streams), all streams submitted at once. 'whole' = "
        "the same requests as one non-streamed batch (its first audio comes when it ends). RTF = audio s per "
        "wall s.\n\n" + table(headers, rows)
    )


def report_http(result: dict[str, Any]) -> str:
    rows = [
        [*_cells(r), f"{r['stream_audio_s']:.1f} / {r['whole_audio_s']:.1f}", f"{r['stream_rtf']:.2f}"]
        for r in result["rows"]
    ]
    headers = ["streams", "TTFA ms", "streamed total s", "whole s", "TTFA / whole", "total / whole"]
    headers += ["audio s streamed / whole", "RTF streamed"]
    return (
        f"\n## Streaming over HTTP: {result['url']}, median of {result['repeat']}\n\n"
        "TTFA = first byte of /v1/tts/stream (median over the concurrent streams); 'streamed total' = end of "
        "the last stream; 'whole' = answer time of the last /v1/tts/synthesize call for the same requests at "
        "the same concurrency (not streamed: its first byte is its end). Audio s: all requests together; "
        "equal in both columns only when the server decodes greedily (TTS_GREEDY=true).\n\n" + table(headers, rows)
    )
