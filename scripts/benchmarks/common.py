"""What every benchmark shares: the environment line, a peak-memory sampler, the texts, the model and
settings to measure with, a started server, and markdown tables."""

from __future__ import annotations

import argparse
import contextlib
import platform
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from local_server import running_server

from tts_service.codec import FRAME_RATE_HZ
from tts_service.dev.tiny_checkpoint import CODEC_EOS, ensure_tiny_checkpoint
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.settings import Settings

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


def audio_seconds(frames: int) -> float:
    return frames / FRAME_RATE_HZ


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align_first_left: bool = False) -> str:
    """A markdown table (numbers right-aligned), as docs/PERFORMANCE.md holds them."""
    rule = ["---" if align_first_left and i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def ms_per_step(
    step: Any,
    weights: Any,
    state: Any,
    n: int,
    kv_len: int,
    steps: int,
    device: str,
    warm: int = 1,
    sample: bool = False,
) -> float:
    """Milliseconds per frame step of `step` (`frame_step` or a drop-in) over rows [:n], after `warm`
    untimed steps; greedy unless `sample`."""
    import torch

    with torch.inference_mode():
        for _ in range(warm):
            step(weights, state, n, kv_len, sample)
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step(weights, state, n, kv_len, sample)
        sync(device)
    return (time.perf_counter() - started) / steps * 1000


def model_label(args: argparse.Namespace) -> str:
    return args.arch if args.arch != "tiny" else args.model


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
        **{
            "compile_step": getattr(args, "compile_step", False),
            "decoder_worker": getattr(args, "decoder_worker", "auto"),
            **overrides,
        },
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


def long_requests(count: int) -> list[SynthesisRequest]:
    return [
        SynthesisRequest(LONG_TEXTS[i % len(LONG_TEXTS)], VOICES[i % 4][0], VOICES[i % 4][1], "") for i in range(count)
    ]


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


@contextlib.contextmanager
def served(args: argparse.Namespace, max_batch_size: int, log_dir: Path) -> Iterator[str]:
    """A `bentoml serve` of the benchmark's model, greedy (unless `args.sampling`), with this many KV
    slots; its URL."""
    env = {
        "TTS_MODEL": resolve_model(args),
        "TTS_CACHE_DIR": str(args.cache_dir),
        "TTS_GREEDY": "false" if getattr(args, "sampling", False) else "true",
        "TTS_MAX_BATCH_SIZE": str(max_batch_size),
        "TTS_DEVICE": args.device,
        "TTS_COMPILE_STEP": str(getattr(args, "compile_step", False)).lower(),
        "TTS_DECODER_WORKER": getattr(args, "decoder_worker", "auto"),
    }
    with running_server(env, log_dir / f"serve-batch{max_batch_size}.log", ready_timeout_s=900) as server:
        yield server.url
