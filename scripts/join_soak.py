"""Memory over many joins: N requests stream through the step engine, at most --concurrency at a time (each
joins as the oldest leaves, so joins and leaves happen mid-batch), with memory read every --every joins.
Device memory (allocated and reserved) on a GPU, this process's resident memory on both. Neither may grow
once the first --every joins have warmed the allocator.

    python scripts/join_soak.py --model tiny --device cpu --joins 300
    python scripts/join_soak.py --model /tmp/ckpt/random-1.7b-v1 --device cuda --joins 1000
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import job  # noqa: E402

from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint  # noqa: E402
from tts_service.engine import TTSEngine  # noqa: E402
from tts_service.settings import Settings  # noqa: E402

logger = logging.getLogger("join_soak")


def memory_mb(device: torch.device) -> dict[str, float]:
    reading = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        reading["allocated_mb"] = torch.cuda.memory_allocated(device) / 2**20
        reading["reserved_mb"] = torch.cuda.memory_reserved(device) / 2**20
    return reading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a checkpoint folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tts_service")
    parser.add_argument("--joins", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = str(ensure_tiny_checkpoint(args.cache_dir)) if args.model == "tiny" else args.model
    settings = Settings(model=model, device=args.device, greedy=True, max_batch_size=args.concurrency)
    engine = TTSEngine.load(settings)
    scheduler = engine.scheduler
    device = scheduler.device

    readings: list[tuple[int, dict[str, float]]] = [(0, memory_mb(device))]
    in_flight: collections.deque = collections.deque()
    started, submitted, done = time.perf_counter(), 0, 0
    while done < args.joins:
        while submitted < args.joins and len(in_flight) < args.concurrency:
            frames = 8 + submitted % 17  # lengths differ, so rows leave at different steps
            request = job(submitted, frames, scheduler.stream_plan)
            in_flight.append(scheduler.submit(request, f"join-{submitted}"))
            submitted += 1
        handle = in_flight.popleft()
        handle.collect()
        if handle.end is None or handle.end.error:
            raise SystemExit(f"request {handle.request_id} failed: {handle.end}")
        done += 1
        if done % args.every == 0:
            readings.append((done, memory_mb(device)))
    wall = time.perf_counter() - started

    keys = list(readings[0][1])
    print(f"\n## Memory over {args.joins} joins, {args.concurrency} at a time, {device} ({wall:.1f} s)\n")
    print("| joins | " + " | ".join(keys) + " |")
    print("| ---: | " + " | ".join("---:" for _ in keys) + " |")
    for joins, reading in readings:
        print(f"| {joins} | " + " | ".join(f"{reading[k]:.1f}" for k in keys) + " |")
    base = readings[1][1] if len(readings) > 2 else readings[0][1]
    growth = {k: readings[-1][1][k] - base[k] for k in keys}
    print(
        f"\nGrowth from {readings[1][0] if len(readings) > 2 else 0} to {readings[-1][0]} joins: "
        + ", ".join(f"{k} {v:+.1f} MB" for k, v in growth.items())
    )


if __name__ == "__main__":
    main()
