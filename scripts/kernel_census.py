"""Kernel-launching ops of one frame step in each of its forms, greedy and sampled: qwen-tts's ops, the GPU's
fewer-kernel forms, and those with the Triton kernels (a launch counted as one; on a CPU they run in Triton's
interpreter, slowly, which the count does not see). No GPU needed: on a GPU the same ops launch the kernels
counted here, and bench_engine.py --kernel-forms adds what the profiler sees inside SDPA and the times.

    python scripts/kernel_census.py --arch deep --dtype bfloat16      # the released layer counts
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from census import census  # noqa: E402

from tts_service import frame_step as fs  # noqa: E402
from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint  # noqa: E402
from tts_service.engine import TTSEngine  # noqa: E402
from tts_service.settings import Settings  # noqa: E402

FORMS = {"qwen-tts's ops": (False, False), "fewer kernels": (True, False), "fewer + Triton": (True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="deep", help="a tiny checkpoint's layout (tiny, deep, 0.6b, 1.7b)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=1, help="the step's batch")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tts_service")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(
        model=str(ensure_tiny_checkpoint(args.cache_dir, args.arch)),
        device="cpu",
        dtype=args.dtype,
        max_batch_size=max(args.rows, 2),
        cache_dir=args.cache_dir,
        batch_invariant=False,
    )
    scheduler = TTSEngine.load(settings).scheduler
    counts: dict[str, dict[str, int]] = {}
    with torch.inference_mode():
        for name, (fewer, triton) in FORMS.items():
            w = fs.with_fewer_kernels(scheduler.weights, fewer, triton)
            for sample in (False, True):
                fs.frame_step(w, scheduler.state, args.rows, 256, sample)  # (warm: first calls may differ)
                with census() as counted:
                    fs.frame_step(w, scheduler.state, args.rows, 256, sample)
                if counted.syncs:
                    raise SystemExit(f"{name}: {counted.syncs} host syncs in the step: {counted.sync_ops}")
                counts.setdefault(name, {})["sampled" if sample else "greedy"] = counted.kernels
    print(f"\n## Kernel-launching ops per frame ({args.arch}, {args.dtype}, batch {args.rows}, keys 256)\n")
    print("| forms | greedy | sampled |")
    print("| --- | ---: | ---: |")
    for name, row in counts.items():
        print(f"| {name} | {row['greedy']:,} | {row['sampled']:,} |")


if __name__ == "__main__":
    main()
