"""The step engine against plain qwen-tts `generate_custom_voice`, on the same batches, at each batch size."""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks import common
from tts_service.engine import SynthesisRequest

logger = logging.getLogger("bench")


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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    engine = common.load_bench_engine(args)
    device = str(engine.model.device)
    memory = common.PeakMemory(device)
    frames = args.frames

    def timed(fn: Any) -> tuple[float, float, Any]:
        common.sync(device)
        with memory.measure():
            started = time.perf_counter()
            out = fn()
            common.sync(device)
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
    with common.eos_suppressed(engine):
        common.engine_batch(engine, common.long_requests(1))  # warm-up: allocator, kernels
        for batch_size in args.batch_sizes:
            batch = common.long_requests(batch_size)
            engine_times, plain_times, engine_peaks, plain_peaks = [], [], [], []
            for _ in range(args.repeat):  # interleaved, so drift hits both alike
                elapsed, peak, results = timed(lambda b=batch: common.engine_batch(engine, b))
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
            row.audio_s = batch_size * common.audio_seconds(frames)
            row.rtf = row.audio_s / row.engine_s
            row.frames_per_s = batch_size * frames / row.engine_s
            row.vs_plain = row.engine_s / row.plain_s
            rows.append(row)
            logger.info("batch %d done: %.2f s", batch_size, row.engine_s)
    base = next((r.rtf for r in rows if r.batch_size == 1), rows[0].rtf)
    for row in rows:
        row.throughput_vs_b1 = row.rtf / base
    return {
        "kind": "engine",
        "model": common.model_label(args),
        "device": device,
        "dtype": str(engine.model.model.dtype),
        "frames": frames,
        "repeat": args.repeat,
        "env": common.environment(),
        "rows": [asdict(r) for r in rows],
    }


def report(result: dict[str, Any]) -> str:
    frames, device = result["frames"], result["device"]
    memory = "CUDA allocator peak." if device.startswith("cuda") else "process RSS peak."
    rows = [
        (
            r["batch_size"],
            f"{r['engine_s']:.3f}",
            f"{r['plain_s']:.3f}",
            f"{r['vs_plain']:.2f}x",
            f"{r['frames_per_s']:.1f}",
            f"{r['rtf']:.2f}",
            f"{r['throughput_vs_b1']:.2f}x",
            f"{r['engine_peak_mb']:.0f}",
        )
        for r in result["rows"]
    ]
    headers = [
        "batch",
        "engine s",
        "plain qwen-tts s",
        "vs plain",
        "frames/s",
        "RTF",
        "throughput vs batch 1",
        "peak MB",
    ]
    return (
        f"\n## Engine: {result['model']}, {frames} frames ({common.audio_seconds(frames):.1f} s audio) per item, "
        f"{result['dtype']} on {device}, median of {result['repeat']}\n\n"
        "RTF = audio seconds per wall second (higher is better). 'vs plain' = engine wall / plain "
        f"qwen-tts generate_custom_voice wall on the same batch. Peak memory: {memory}\n\n"
        + common.table(headers, rows)
    )
