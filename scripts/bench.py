"""Benchmarks, side by side in one run: the frame step against wave 1's step and plain qwen-tts, the step
engine against plain qwen-tts, the HTTP service with one KV slot against many, bursts, and streams.
Real-time factor (RTF) here is audio seconds per wall second: higher is better.

    python scripts/bench.py step --arch deep                         # frame step: new vs old vs plain
    python scripts/bench.py engine --model tiny                      # CPU, tiny checkpoint
    python scripts/bench.py engine --arch 1.7b --device cuda          # random weights, real 1.7B sizes
    python scripts/bench.py service --model tiny                      # starts bentoml serve twice
    python scripts/bench.py burst --model tiny                        # concurrency, recovery, stream gaps
    python scripts/bench.py service --url http://127.0.0.1:8000       # an already running service

docs/PERFORMANCE.md records the results and the commands that produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import running_server  # noqa: E402

from tts_service.engine import SynthesisRequest, TTSEngine  # noqa: E402
from tts_service.settings import Settings  # noqa: E402
from tts_service.tiny_checkpoint import ARCHS, CODEC_EOS, ensure_tiny_checkpoint  # noqa: E402

logger = logging.getLogger("bench")
FRAME_RATE = 12.5  # codec frames per second of audio
FRAME_BYTES = 2 * 1920  # 16-bit PCM bytes per codec frame (24 kHz / 12.5 Hz samples)

# Long enough that the engine's text-based frame budget never cuts below --frames (up to ~500).
LONG_TEXTS = [
    "The east wing of the gallery opens at nine. Please keep to the marked paths, and ask any guide "
    "if you would like to hear more about the paintings, the sculptures or the history of the house itself.",
    "Welcome aboard. Our journey today takes us along the coast, past the old lighthouse and the fishing "
    "villages, before we turn inland towards the mountains where the weather can change very quickly.",
    "In the beginning the workshop made only clocks, but over the years the craftsmen learned to build "
    "music boxes, small automatons and finally the great mechanical orchestra that still plays each noon.",
    "Remember to drink water, stretch your legs and look away from the screen every twenty minutes; the "
    "headset will remind you, but it is easy to forget when the game is this absorbing and the hours fly.",
]
VOICES = [("ryan", "english"), ("vivian", "chinese"), ("sohee", "korean"), ("aiden", "auto")]
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
SERVICE_TEXTS = [
    "Hello and welcome to the virtual gallery.",
    "The next exhibit is just around the corner.",
    "Please take a seat, the show starts soon.",
    "Would you like to hear the story of this painting?",
]


def environment() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or "?"}
    info["cpu_cores"] = psutil.cpu_count()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- engine level ---------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, else sampled resident set size (RSS)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak_mb = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        process, peak, done = psutil.Process(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.peak_mb = max(peak[0], process.memory_info().rss) / 2**20


@contextlib.contextmanager
def eos_suppressed(engine: TTSEngine) -> Iterator[None]:
    """Make every item run to max_new_tokens, so runs of any batch size generate the same frame count:
    for plain qwen-tts through its codec head's output, for the step engine through its suppress mask."""
    import torch

    def mask_eos(_module: Any, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        logits[..., CODEC_EOS] = float("-inf")
        return logits

    handle = engine.model.model.talker.codec_head.register_forward_hook(mask_eos)
    with torch.inference_mode():
        engine.scheduler.weights.suppress[CODEC_EOS] = True
    try:
        yield
    finally:
        handle.remove()
        with torch.inference_mode():
            engine.scheduler.weights.suppress[CODEC_EOS] = False


def engine_batch(engine: TTSEngine, requests: list[SynthesisRequest]) -> list[Any]:
    """Submit all at once as whole-file requests and wait for every one; their RequestEnds."""
    handles = [engine.submit(r, f"bench-{i}-{time.monotonic_ns()}", stream=False) for i, r in enumerate(requests)]
    for handle in handles:
        list(handle)
    return [handle.end for handle in handles]


@dataclass
class EngineRow:
    batch_size: int
    frames_per_item: int
    engine_s: float
    plain_s: float
    engine_peak_mb: float
    plain_peak_mb: float
    audio_s: float = 0.0
    rtf: float = 0.0  # audio seconds per wall second (engine), higher is better
    frames_per_s: float = 0.0
    vs_plain: float = 0.0  # engine wall / plain qwen-tts wall
    throughput_vs_b1: float = 0.0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def resolve_model(args: argparse.Namespace) -> str:
    if args.arch != "tiny":
        return str(ensure_tiny_checkpoint(args.cache_dir, arch=args.arch))
    return args.model


def bench_settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Greedy on the chosen model and device: the in-process benchmarks compare fixed amounts of work."""
    return Settings(
        model=resolve_model(args),
        device=args.device,
        dtype=getattr(args, "dtype", "auto"),
        cache_dir=args.cache_dir,
        greedy=True,
        **overrides,
    )


def load_bench_engine(args: argparse.Namespace) -> TTSEngine:
    """Capped at --frames, no text limit, every text one generation."""
    settings = bench_settings(
        args,
        max_new_tokens=args.frames,
        max_text_chars=100_000,
        max_batch_size=max(16, *getattr(args, "batch_sizes", [1]), *getattr(args, "concurrency", [1])),
        segment_chars=100_000,  # the benchmark texts stay one generation each
        stream_first_frames=getattr(args, "first_frames", 4),
        stream_chunk_frames=getattr(args, "chunk_frames", 16),
        stream_left_context=getattr(args, "left_context", 25),
    )
    return TTSEngine.load(settings)


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    engine = load_bench_engine(args)
    device = str(engine.model.device)
    memory = PeakMemory(device)
    frames = args.frames

    def requests(batch: int) -> list[SynthesisRequest]:
        return [
            SynthesisRequest(LONG_TEXTS[i % len(LONG_TEXTS)], VOICES[i % 4][0], VOICES[i % 4][1], "")
            for i in range(batch)
        ]

    def timed(fn: Any) -> tuple[float, float, Any]:
        sync(device)
        with memory.measure():
            started = time.perf_counter()
            out = fn()
            sync(device)
            elapsed = time.perf_counter() - started
        return elapsed, memory.peak_mb, out

    def plain(batch: list[SynthesisRequest]) -> Any:
        return engine.model.generate_custom_voice(
            text=[r.text for r in batch],
            speaker=[r.speaker for r in batch],
            language=[r.language for r in batch],
            instruct=[r.instruct for r in batch],
            max_new_tokens=frames + 1,
            do_sample=False,
            subtalker_dosample=False,
        )

    rows: list[EngineRow] = []
    with eos_suppressed(engine):
        engine_batch(engine, requests(1))  # warm-up: allocator, kernels
        for batch_size in args.batch_sizes:
            batch = requests(batch_size)
            engine_times, plain_times, engine_peaks, plain_peaks = [], [], [], []
            for _ in range(args.repeat):  # interleaved, so drift hits both alike
                elapsed, peak, results = timed(lambda b=batch: engine_batch(engine, b))
                produced = {r.frames for r in results}
                if produced != {frames}:
                    raise RuntimeError(f"expected {frames} frames per item, got {sorted(produced)}")
                engine_times.append(elapsed)
                engine_peaks.append(peak)
                elapsed, peak, (wavs, _rate) = timed(lambda b=batch: plain(b))
                if {len(w) // engine.samples_per_frame for w in wavs} != {frames}:
                    raise RuntimeError("plain qwen-tts produced a different frame count")
                plain_times.append(elapsed)
                plain_peaks.append(peak)
            row = EngineRow(
                batch_size,
                frames,
                statistics.median(engine_times),
                statistics.median(plain_times),
                max(engine_peaks),
                max(plain_peaks),
            )
            row.audio_s = batch_size * frames / FRAME_RATE
            row.rtf = row.audio_s / row.engine_s
            row.frames_per_s = batch_size * frames / row.engine_s
            row.vs_plain = row.engine_s / row.plain_s
            rows.append(row)
            logger.info("batch %d done: %.2f s", batch_size, row.engine_s)
    base = next((r.rtf for r in rows if r.batch_size == 1), rows[0].rtf)
    for row in rows:
        row.throughput_vs_b1 = row.rtf / base
    label = args.arch if args.arch != "tiny" else args.model
    print(
        f"\n## Engine: {label}, {frames} frames ({frames / FRAME_RATE:.1f} s audio) per item, "
        f"{engine.model.model.dtype} on {device}, median of {args.repeat}\n"
    )
    print(
        "RTF = audio seconds per wall second (higher is better). 'vs plain' = engine wall / plain "
        "qwen-tts generate_custom_voice wall on the same batch. Peak memory: "
        + ("CUDA allocator peak." if device.startswith("cuda") else "process RSS peak.")
    )
    print()
    print("| batch | engine s | plain qwen-tts s | vs plain | frames/s | RTF | throughput vs batch 1 | peak MB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r.batch_size} | {r.engine_s:.3f} | {r.plain_s:.3f} | {r.vs_plain:.2f}x | {r.frames_per_s:.1f} "
            f"| {r.rtf:.2f} | {r.throughput_vs_b1:.2f}x | {r.engine_peak_mb:.0f} |"
        )
    return {"kind": "engine", "model": label, "device": device, "env": environment(), "rows": [asdict(r) for r in rows]}


# --- service level --------------------------------------------------------------------------------


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
    """BentoML's dispatcher calibrates on its first ~11 calls, served one at a time."""
    with httpx.Client(base_url=url, timeout=600) as http:
        for i in range(count):
            http.post("/v1/tts/synthesize", json={"text": SERVICE_TEXTS[i % 4], "speaker": "ryan"}).raise_for_status()


@contextlib.contextmanager
def served(args: argparse.Namespace, max_batch_size: int, log_dir: Path) -> Iterator[str]:
    env = {
        "TTS_MODEL": resolve_model(args),
        "TTS_CACHE_DIR": str(args.cache_dir),
        "TTS_GREEDY": "true",
        "TTS_MAX_BATCH_SIZE": str(max_batch_size),
        "TTS_DEVICE": args.device,
    }
    with running_server(env, log_dir / f"serve-batch{max_batch_size}.log", ready_timeout_s=900) as server:
        yield server.url


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


@dataclass
class Series:
    """One server's run: lone latency after warm-up, the load levels, lone latency after the load."""

    lone_before_s: float
    levels: list[LoadResult]
    lone_after_s: float


def series(url: str, levels: list[int], total: int) -> Series:
    warm_up(url)
    before = lone_latency(url)
    results = [asyncio.run(drive(url, level, max(total, level))) for level in levels]
    return Series(before, results, lone_latency(url))


def print_load(title: str, results: list[LoadResult]) -> None:
    for r in results:
        for example in r.failure_examples:
            logger.warning("failed request at %d clients: %s", r.concurrency, example)
    print(f"\n### {title}\n")
    print("| clients | requests | failed | req/s | audio s/s | p50 s | p95 s | p99 s | mean batch | max batch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        sizes = r.batch_sizes or [0]
        print(
            f"| {r.concurrency} | {r.requests} | {r.failures} | {r.rps:.2f} | {r.audio_per_s:.2f} | {r.pct(0.5):.3f} "
            f"| {r.pct(0.95):.3f} | {r.pct(0.99):.3f} | {statistics.mean(sizes):.2f} | {max(sizes)} |"
        )


def run_service(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "service", "env": environment()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            batched, unbatched = series(args.url, args.concurrency, args.requests), None
        else:
            with served(args, args.max_batch_size, Path(tmp)) as url:
                batched = series(url, args.concurrency, args.requests)
            with served(args, 1, Path(tmp)) as url:
                unbatched = series(url, args.concurrency, args.requests)
    engine_s = engine_latency(args)
    print(f"\n## Service: {args.url or args.model}, greedy, {args.requests} requests per level")
    print_load(f"Batching on (max batch {args.max_batch_size if not args.url else 'as configured'})", batched.levels)
    out["batched"] = [asdict(r) for r in batched.levels]
    runs = {"batching on": batched}
    if unbatched:
        runs["batching off"] = unbatched
        print_load("Batching off (TTS_MAX_BATCH_SIZE=1)", unbatched.levels)
        print("\n### Throughput ratio, batching on / off, same load\n")
        print("| clients | req/s ratio | audio s/s ratio | p50 latency ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for on, off in zip(batched.levels, unbatched.levels, strict=True):
            print(
                f"| {on.concurrency} | {on.rps / off.rps:.2f}x | {on.audio_per_s / off.audio_per_s:.2f}x "
                f"| {on.pct(0.5) / off.pct(0.5):.2f}x |"
            )
        out["unbatched"] = [asdict(r) for r in unbatched.levels]
    print("\n### One request at a time (same greedy request, median of 5), and the HTTP overhead\n")
    print(f"In-process engine time for this request: {engine_s * 1000:.1f} ms.\n")
    print("| server | after warm-up ms | overhead vs engine ms | after the load above ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, run in runs.items():
        print(
            f"| {name} | {run.lone_before_s * 1000:.1f} | {(run.lone_before_s - engine_s) * 1000:.1f} "
            f"| {run.lone_after_s * 1000:.1f} |"
        )
        out[f"{name} lone ms"] = {"before": run.lone_before_s * 1000, "after": run.lone_after_s * 1000}
    out["engine_ms"] = engine_s * 1000
    return out


async def _http_stream_round(url: str, count: int) -> tuple[list[float], list[float], list[float], int, int]:
    """`count` streams at once, then the same requests at once on /v1/tts/synthesize. Per request:
    first byte and end of the stream, end of the whole file; and the audio frames of both (equal when
    the server decodes greedily, TTS_GREEDY=true)."""
    bodies = [HTTP_STREAM_BODIES[i % len(HTTP_STREAM_BODIES)] for i in range(count)]
    first = [0.0] * count
    last = [0.0] * count
    whole = [0.0] * count
    frames = [0] * count
    whole_frames = [0] * count
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


def run_stream_http(args: argparse.Namespace) -> dict[str, Any]:
    """The same comparison over HTTP against a running service: first byte of /v1/tts/stream vs the
    answer of /v1/tts/synthesize, for the same requests sent at the same concurrency."""
    rows = []
    asyncio.run(_http_stream_round(args.url, 1))  # warm-up
    for count in args.concurrency:
        ttfa, done, whole, audio, whole_audio = [], [], [], [], []
        for _ in range(args.repeat):
            first, last, whole_s, frames, whole_frames = asyncio.run(_http_stream_round(args.url, count))
            ttfa.append(statistics.median(first))
            done.append(max(last))
            whole.append(max(whole_s))
            audio.append(frames / FRAME_RATE)
            whole_audio.append(whole_frames / FRAME_RATE)
        row = {
            "streams": count,
            "ttfa_ms": statistics.median(ttfa) * 1000,
            "stream_total_s": statistics.median(done),
            "whole_s": statistics.median(whole),
            "stream_audio_s": statistics.median(audio),
            "whole_audio_s": statistics.median(whole_audio),
        }
        row["ttfa_vs_whole"] = row["ttfa_ms"] / 1000 / row["whole_s"]
        row["total_vs_whole"] = row["stream_total_s"] / row["whole_s"]
        row["stream_rtf"] = row["stream_audio_s"] / row["stream_total_s"]
        rows.append(row)
    print(f"\n## Streaming over HTTP: {args.url}, median of {args.repeat}\n")
    print(
        "TTFA = first byte of /v1/tts/stream (median over the concurrent streams); 'streamed total' = end of "
        "the last stream; 'whole' = answer time of the last /v1/tts/synthesize call for the same requests at "
        "the same concurrency (not streamed: its first byte is its end). Audio s: all requests together; "
        "equal in both columns only when the server decodes greedily (TTS_GREEDY=true).\n"
    )
    print(
        "| streams | TTFA ms | streamed total s | whole s | TTFA / whole | total / whole "
        "| audio s streamed / whole | RTF streamed |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['streams']} | {r['ttfa_ms']:.0f} | {r['stream_total_s']:.2f} | {r['whole_s']:.2f} | "
            f"{r['ttfa_vs_whole']:.3f} | {r['total_vs_whole']:.2f} | "
            f"{r['stream_audio_s']:.1f} / {r['whole_audio_s']:.1f} | {r['stream_rtf']:.2f} |"
        )
    return {"environment": environment(), "url": args.url, "rows": rows}


def run_stream(args: argparse.Namespace) -> dict[str, Any]:
    """Time to first audio and whole-utterance time, streamed vs not, for each concurrency, in one run."""
    if args.url:
        return run_stream_http(args)
    engine = load_bench_engine(args)
    device = str(engine.model.device)
    frames = args.frames

    def requests(count: int) -> list[SynthesisRequest]:
        return [
            SynthesisRequest(LONG_TEXTS[i % len(LONG_TEXTS)], VOICES[i % 4][0], VOICES[i % 4][1], "")
            for i in range(count)
        ]

    def streamed(batch: list[SynthesisRequest]) -> tuple[list[float], list[float]]:
        """All streams submitted at once; per stream: first chunk and last chunk times."""
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
        streamed(requests(1))  # warm-up
        whole(requests(1))
        for count in args.concurrency:
            batch = requests(count)
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
            row["ttfa_vs_whole"] = row["ttfa_ms"] / 1000 / row["whole_s"]
            row["total_vs_whole"] = row["stream_total_s"] / row["whole_s"]
            row["stream_rtf"] = count * frames / FRAME_RATE / row["stream_total_s"]
            rows.append(row)
    label = args.arch if args.arch != "tiny" else args.model
    print(
        f"\n## Streaming: {label}, {frames} frames ({frames / FRAME_RATE:.1f} s audio) per stream, "
        f"{engine.model.model.dtype} on {device}, chunks {args.first_frames} then {args.chunk_frames} frames, "
        f"left context {args.left_context}, median of {args.repeat}\n"
    )
    print(
        "TTFA = time to the first audio chunk (median over streams), all streams submitted at once. 'whole' = "
        "the same requests as one non-streamed batch (its first audio comes when it ends). RTF = audio s per wall s.\n"
    )
    print("| streams | TTFA ms | streamed total s | whole (not streamed) s | TTFA / whole | total / whole | RTF |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['streams']} | {r['ttfa_ms']:.0f} | {r['stream_total_s']:.2f} | {r['whole_s']:.2f} | "
            f"{r['ttfa_vs_whole']:.3f} | {r['total_vs_whole']:.2f} | {r['stream_rtf']:.2f} |"
        )
    return {"environment": environment(), "model": label, "device": device, "rows": rows}


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    from bench_step import measure_step, print_step

    settings = bench_settings(
        args,
        cuda_graphs=False,
        max_batch_size=max(args.batch_sizes),
        max_new_tokens=args.steps * (args.repeat + 4),
        max_prompt_tokens=256,
    )
    engine = TTSEngine.load(settings)
    rows = measure_step(engine, args.batch_sizes, args.steps, args.repeat)
    label = args.arch if args.arch != "tiny" else args.model
    print_step(rows, f"{label}, {engine.model.model.dtype} on {engine.model.device}", args.steps, args.repeat)
    return {"kind": "step", "model": label, "env": environment(), "rows": rows}


def run_burst(args: argparse.Namespace) -> dict[str, Any]:
    from bench_burst import measure_burst, print_burst

    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            result = measure_burst(args.url, args.repeat)
        else:
            with served(args, args.max_batch_size, Path(tmp)) as url:
                result = measure_burst(url, args.repeat)
    print_burst(result, args.url or args.model)
    return {"kind": "burst", "env": environment(), **result}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("engine", "service", "stream", "step", "burst"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="tiny", help="TTS_MODEL: tiny, a checkpoint folder or a Hub id")
        p.add_argument(
            "--arch",
            choices=sorted(ARCHS),
            default="tiny",
            help="build random weights at these sizes instead of --model (0.6b, 1.7b: real sizes)",
        )
        p.add_argument("--device", default="auto")
        p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tts_service")
        p.add_argument("--json", type=Path, help="also write the results here")
    engine = sub.choices["engine"]
    engine.add_argument("--dtype", default="auto")
    engine.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    engine.add_argument("--frames", type=int, default=64, help="codec frames per item (12.5 per audio second)")
    engine.add_argument("--repeat", type=int, default=3)
    stream = sub.choices["stream"]
    stream.add_argument("--dtype", default="auto")
    stream.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    stream.add_argument("--frames", type=int, default=64, help="codec frames per stream (12.5 per audio second)")
    stream.add_argument("--first-frames", type=int, default=4)
    stream.add_argument("--chunk-frames", type=int, default=16)
    stream.add_argument("--left-context", type=int, default=25)
    stream.add_argument("--repeat", type=int, default=3)
    stream.add_argument("--url", help="measure over HTTP against this running service instead of in-process")
    step = sub.choices["step"]
    step.add_argument("--dtype", default="auto")
    step.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    step.add_argument("--steps", type=int, default=10, help="frames timed per run")
    step.add_argument("--repeat", type=int, default=3)
    burst = sub.choices["burst"]
    burst.add_argument("--url", help="drive this running service instead of starting one")
    burst.add_argument("--repeat", type=int, default=3)
    burst.add_argument("--max-batch-size", type=int, default=32)
    service = sub.choices["service"]
    service.add_argument("--url", help="drive this running service instead of starting two")
    service.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    service.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    service.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("tts_service").setLevel(logging.WARNING)
    commands = {
        "engine": run_engine,
        "service": run_service,
        "stream": run_stream,
        "step": run_step,
        "burst": run_burst,
    }
    result = commands[args.command](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
