"""How far Inductor fusion takes the frame step: compile time, kernels per frame, step time, and the first
frame where the compiled step's codes differ from the eager step's (same state, greedy).

    python scripts/compile_probe.py --arch 1.7b --device cuda --batch 1 8
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tts_service import frame_step as fs  # noqa: E402
from tts_service.dev.tiny_checkpoint import CODEC_EOS, ensure_tiny_checkpoint  # noqa: E402
from tts_service.engine import TTSEngine  # noqa: E402
from tts_service.settings import Settings  # noqa: E402

TEXT = "The east wing of the gallery opens at nine. Please keep to the marked paths."


def snapshot(state: fs.SlotState) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v]) for k, v in vars(state).items()}


def restore(state: fs.SlotState, saved: dict) -> None:
    for key, value in saved.items():
        current = getattr(state, key)
        if isinstance(value, torch.Tensor):
            current.copy_(value)
        else:
            for c, v in zip(current, value, strict=True):
                c.copy_(v)


def run(step, w, s, n: int, kv: int, frames: int) -> torch.Tensor:
    return torch.stack([step(w, s, n, kv, False)[0].clone() for _ in range(frames)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="1.7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tts_service")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--mode", default="default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(
        model=str(ensure_tiny_checkpoint(args.cache_dir, args.arch)),
        device=args.device,
        greedy=True,
        cuda_graphs=False,
        max_batch_size=max(args.batch),
        max_new_tokens=256,
        max_prompt_tokens=128,
        cache_dir=args.cache_dir,
    )
    engine = TTSEngine.load(settings)
    sch = engine.scheduler
    w, s = sch.weights, sch.state
    kv = 256
    with torch.inference_mode():
        w.suppress[CODEC_EOS] = True
        for n in args.batch:
            prompts = [sch.prompts.build(TEXT, "ryan", "english") for _ in range(n)]
            fs.prefill(w, s, list(range(n)), prompts, [sch.sampling_params(i) for i in range(n)])
            saved = snapshot(s)
            eager = run(fs.frame_step, w, s, n, kv, args.frames)
            restore(s, saved)
            torch._dynamo.reset()
            compiled = torch.compile(
                fs.frame_step, fullgraph=True, dynamic=False, mode=None if args.mode == "default" else args.mode
            )
            started = time.perf_counter()
            compiled(w, s, n, kv, False)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            restore(s, saved)
            fast = run(compiled, w, s, n, kv, args.frames)
            differs = (eager != fast).any(dim=-1).any(dim=-1).nonzero()
            first_diff = int(differs[0]) if len(differs) else None
            # graph of the compiled step
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                compiled(w, s, n, kv, False)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                compiled(w, s, n, kv, False)

            def timed(fn, repeat=30):
                fn()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(repeat):
                    fn()
                torch.cuda.synchronize()
                return (time.perf_counter() - t) / repeat * 1000

            eager_graph = torch.cuda.CUDAGraph()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fs.frame_step(w, s, n, kv, False)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(eager_graph):
                fs.frame_step(w, s, n, kv, False)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                graph.replay()
                torch.cuda.synchronize()
            kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
            print(
                f"batch {n}: compile {compile_s:.0f} s | eager graph {timed(eager_graph.replay):.2f} ms | "
                f"compiled graph {timed(graph.replay):.2f} ms | compiled no graph "
                f"{timed(lambda c=compiled, n=n: c(w, s, n, kv, False)):.2f} ms | kernels/frame compiled {kernels} | "
                f"first frame differing from eager: {first_diff} of {args.frames}",
                flush=True,
            )


if __name__ == "__main__":
    main()
