"""Benchmarks, side by side in one run: the frame step against wave 1's step and plain qwen-tts, the step
engine against plain qwen-tts, the HTTP service with one KV slot against many, bursts, and streams.
Real-time factor (RTF) here is audio seconds per wall second: higher is better.

    python scripts/bench.py step --arch deep                         # frame step: new vs old vs plain
    python scripts/bench.py engine --model tiny                      # CPU, tiny checkpoint
    python scripts/bench.py engine --arch 1.7b --device cuda          # random weights, real 1.7B sizes
    python scripts/bench.py service --model tiny                      # starts bentoml serve twice
    python scripts/bench.py burst --model tiny                        # concurrency, recovery, stream gaps
    python scripts/bench.py burst --model tiny --compile-step         # the same with the compiled frame step
    python scripts/bench.py service --url http://127.0.0.1:8000       # an already running service
    python scripts/bench.py startup --arch 1.7b --baseline /tmp/base  # seconds to /readyz, two checkouts
    python scripts/bench.py kvmemory --arch 1.7b --baseline /tmp/base # CPU KV memory through a burst

Each benchmark is a module of scripts/benchmarks/ whose `measure(args)` returns the figures and whose
`report(result)` formats them as the markdown tables docs/PERFORMANCE.md records.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tts_service.dev.tiny_checkpoint import ARCHS  # noqa: E402

BENCHMARKS = ("engine", "service", "stream", "step", "burst", "startup", "kvmemory")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = root.add_subparsers(dest="command", required=True)
    for name in BENCHMARKS:
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
        if name != "step":  # the step benchmark times the compiled step beside the eager one (--compiled)
            p.add_argument("--compile-step", action="store_true", help="TTS_COMPILE_STEP=true for the engine")
            p.add_argument(
                "--decoder-worker", choices=("auto", "thread", "process"), default="auto", help="TTS_DECODER_WORKER"
            )
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
    step.add_argument("--compiled", action="store_true", help="also time the step compiled with Inductor")
    burst = sub.choices["burst"]
    burst.add_argument("--url", help="drive this running service instead of starting one")
    burst.add_argument("--repeat", type=int, default=3)
    burst.add_argument("--max-batch-size", type=int, default=32)
    burst.add_argument(
        "--sampling",
        action="store_true",
        help="the service's default sampling (no TTS_GREEDY), each line with a fixed seed so that runs compare",
    )
    startup = sub.choices["startup"]
    startup.add_argument("--baseline", type=Path, help="another checkout of this repository, started in turn")
    startup.add_argument("--starts", type=int, default=2, help="a first start, then restarts")
    startup.add_argument("--max-batch-size", type=int, default=32, help="TTS_MAX_BATCH_SIZE (KV slots)")
    startup.add_argument("--max-new-tokens", type=int, help="TTS_MAX_NEW_TOKENS (the KV's length); unset: default")
    startup.add_argument("--ready-timeout", type=float, default=900)
    kvmemory = sub.choices["kvmemory"]
    kvmemory.add_argument("--baseline", type=Path, help="another checkout of this repository, run first")
    kvmemory.add_argument("--long-frames", type=int, default=300, help="the long request's frames (TTS_MAX_NEW_TOKENS)")
    kvmemory.add_argument("--short-requests", type=int, default=3, help="short requests beside it")
    kvmemory.add_argument("--kv-memory-gb", type=float, help="also run this tree with this TTS_KV_MEMORY_GB")
    service = sub.choices["service"]
    service.add_argument("--url", help="drive this running service instead of starting two")
    service.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    service.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    service.add_argument("--max-batch-size", type=int, default=16)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("tts_service").setLevel(logging.WARNING)
    benchmark = importlib.import_module(f"benchmarks.{args.command}")
    result = benchmark.measure(args)
    print(benchmark.report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
