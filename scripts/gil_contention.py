"""Why steps slow down while the decoder works, on a CPU: the frame step timed alone, beside the decoder
decoding in a thread, beside the decoder in its child process (the CPU's serving mode), and beside a
thread doing the same kind of compute without taking the GIL often (large matrix products). Same
weights, one intra-op thread each, interleaved.

    python scripts/gil_contention.py --batch 4                      # tiny checkpoint, eager step
    python scripts/gil_contention.py --batch 4 --compiled           # the Inductor-compiled step

If the step slows beside the decoder but not beside the matrix products, the cost is the GIL (each of
the step's thousands of torch calls takes it back from the decoder's), not the cores or the caches.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tts_service import frame_step as fs  # noqa: E402
from tts_service.decoder_process import DecoderProcess  # noqa: E402
from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint  # noqa: E402
from tts_service.engine import TTSEngine  # noqa: E402
from tts_service.settings import Settings  # noqa: E402
from tts_service.step_compiler import CompiledFrameStep  # noqa: E402

TEXT = "The east wing of the gallery opens at nine. Please keep to the marked paths and ask any guide."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tts_service")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    settings = Settings(
        model=str(ensure_tiny_checkpoint(args.cache_dir, args.arch)),
        cache_dir=args.cache_dir,
        device="cpu",
        greedy=True,
        max_batch_size=max(args.batch, 3),
        max_new_tokens=args.steps * (3 * args.repeat + 2) + 8,
        max_prompt_tokens=256,
        decoder_worker="thread",  # the decoder in this process; its child process is timed separately below
    )
    engine = TTSEngine.load(settings)
    scheduler = engine.scheduler
    w, s = scheduler.weights, scheduler.state
    step: Callable = fs.frame_step
    if args.compiled:
        compiled = CompiledFrameStep()
        compiled.warm_up(w, s, False, 1)
        step = compiled
    n = args.batch
    prompts = [scheduler.prompts.build(TEXT, "ryan", "english") for _ in range(n)]
    with torch.inference_mode():
        fs.prefill(w, s, list(range(n)), prompts, [scheduler.sampling_params(i) for i in range(n)])
    kv_len = -(-(prompts[0].shape[0] + args.steps * (3 * args.repeat + 2) + 1) // 32) * 32
    codes = np.random.default_rng(0).integers(0, 2048, size=(40, 16), dtype=np.int64)
    matrix = torch.randn(512, 512)
    stop = threading.Event()

    def decoder() -> None:
        torch.set_num_threads(1)
        while not stop.is_set():
            scheduler.decoder.decode_stateful(scheduler.decoder.new_state(), codes)

    child = DecoderProcess(scheduler.decoder.decoder)
    child.wait_ready()

    def decoder_process() -> None:  # what serving on a CPU does (TTS_DECODER_WORKER=auto): this thread waits
        while not stop.is_set():
            child.decode_stateful(child.new_state(), codes)

    def products() -> None:
        torch.set_num_threads(1)
        while not stop.is_set():
            torch.mm(matrix, matrix)

    def ms_per_step() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            for _ in range(args.steps):
                step(w, s, n, kv_len, False)
        return (time.perf_counter() - started) / args.steps * 1000

    ms_per_step()  # warm
    others = {
        "alone": None,
        "beside the decoder in a thread": decoder,
        "beside the decoder in its process": decoder_process,
        "beside matrix products": products,
    }
    times: dict[str, list[float]] = {label: [] for label in others}
    for _ in range(args.repeat):
        for label, work in others.items():
            stop.clear()
            thread = threading.Thread(target=work) if work else None
            if thread:
                thread.start()
                time.sleep(0.05)
            times[label].append(ms_per_step())
            stop.set()
            if thread:
                thread.join()
    alone = statistics.median(times["alone"])
    print(f"\n## Frame step beside other threads: {args.arch}, batch {n}, {'compiled' if args.compiled else 'eager'}\n")
    print("| beside | ms per step (median) | vs alone |")
    print("| --- | ---: | ---: |")
    for label, values in times.items():
        print(f"| {label} | {statistics.median(values):.2f} | {statistics.median(values) / alone:.2f}x |")


if __name__ == "__main__":
    main()
