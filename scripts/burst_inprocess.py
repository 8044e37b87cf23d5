"""The burst benchmark's 8 lines in-process (no HTTP): one after another against all together, with the
time spent inside frame steps, to see where the wall time of each side goes.

    python scripts/burst_inprocess.py                       # the serving engine as configured (tiny, greedy)
    python scripts/burst_inprocess.py --decoder thread      # the decoder in a thread instead of its process
    python scripts/burst_inprocess.py --decoder none        # diagnostic: audio replaced by silence
    python scripts/burst_inprocess.py --compile-step        # the Inductor-compiled frame step

`--decoder none` skips the speech decoder (every chunk is silence of the right length): what is left is
the ceiling batching the steps can reach on this machine for this mix, with no decoding work and no
decoder thread contending for the GIL. Not a serving mode.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.burst import LINES  # noqa: E402

from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint  # noqa: E402
from tts_service.engine import SynthesisRequest, TTSEngine  # noqa: E402
from tts_service.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", choices=("auto", "thread", "process", "none"), default="auto")
    parser.add_argument("--compile-step", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tts_service")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(
        model=str(ensure_tiny_checkpoint(args.cache_dir)),
        cache_dir=args.cache_dir,
        device="cpu",
        greedy=True,
        max_batch_size=32,
        compile_step=args.compile_step,
        decoder_worker="thread" if args.decoder == "none" else args.decoder,
    )
    engine = TTSEngine.load(settings)
    scheduler = engine.scheduler
    skipped = [0]  # decoder calls replaced by silence (checked below: a renamed call must not slip through)
    if args.decoder == "none":
        spf = scheduler.samples_per_frame

        def silence(states, codes):
            skipped[0] += 1
            return np.zeros((len(codes), len(codes[0]) * spf), np.float32)

        scheduler.decoder.decode_stateful_many = silence
    step, in_steps = scheduler.step_fn, [0.0]

    def timed_step(*call_args, **kwargs):
        started = time.perf_counter()
        try:
            return step(*call_args, **kwargs)
        finally:
            in_steps[0] += time.perf_counter() - started

    scheduler.step_fn = timed_step
    requests = [SynthesisRequest(t, engine.resolve_speaker(s), engine.resolve_language(lang)) for t, s, lang in LINES]

    def together() -> None:
        threads = [threading.Thread(target=engine.synthesize, args=(r,)) for r in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def one_by_one() -> None:
        for request in requests:
            engine.synthesize(request)

    one_by_one(), together()  # warm
    rows: dict[str, list[tuple[float, float]]] = {"one by one": [], "together": []}
    for _ in range(args.repeat):
        for label, run in (("one by one", one_by_one), ("together", together)):
            in_steps[0] = 0.0
            started = time.perf_counter()
            run()
            rows[label].append((time.perf_counter() - started, in_steps[0]))
    ratios = [a[0] / b[0] for a, b in zip(rows["one by one"], rows["together"], strict=True)]
    if args.decoder == "none" and not skipped[0]:
        raise SystemExit("--decoder none replaced no decoder call: the engine decodes through another method now")
    kind = "compiled" if args.compile_step else "eager"
    print(f"\n## The 8 burst lines in-process: decoder {args.decoder}, step {kind}\n")
    print("| side | wall s (median) | in frame steps s | outside steps s |")
    print("| --- | ---: | ---: | ---: |")
    for label, values in rows.items():
        wall = statistics.median(v[0] for v in values)
        steps = statistics.median(v[1] for v in values)
        print(f"| {label} | {wall:.3f} | {steps:.3f} | {wall - steps:.3f} |")
    each = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"\nRatio one by one / together: median {statistics.median(ratios):.2f}x ({each})")


if __name__ == "__main__":
    main()
