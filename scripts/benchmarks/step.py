"""The frame step alone: the step engine's `frame_step` against wave 1's step (qwen-tts's talker forward with
HF `generate` for the code predictor, on a shared DynamicCache) and against plain qwen-tts
`generate_custom_voice`, per frame, at several batch sizes, interleaved in one run.

    python scripts/bench.py step --arch deep              # the released layer counts at tiny widths (CPU)
    python scripts/bench.py step --arch deep --compiled   # also the step compiled with Inductor (minutes)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.baseline_step import Wave1Step
from benchmarks.common import VOICES, bench_settings, environment, model_label, ms_per_step, sync
from tts_service import frame_step as fs
from tts_service.dev.tiny_checkpoint import CODEC_EOS
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.step_compiler import CompiledFrameStep

TEXT = "The east wing of the gallery opens at nine. Please keep to the marked paths and ask any guide."


def measure_step(
    engine: TTSEngine, batch_sizes: list[int], steps: int, repeat: int, compiled: CompiledFrameStep | None = None
) -> list[dict[str, Any]]:
    """Milliseconds per frame for each batch size: new step (eager, and compiled when given), wave 1's
    step, plain qwen-tts."""
    scheduler = engine.scheduler
    w, s = scheduler.weights, scheduler.state
    device = w.codec_head.device
    hook = engine.model.model.talker.codec_head.register_forward_hook(
        lambda _m, _i, out: out.index_fill(-1, torch.tensor([CODEC_EOS], device=out.device), -1e4)
    )
    rows = []
    try:
        for n in batch_sizes:
            requests = [SynthesisRequest(TEXT, *VOICES[i % len(VOICES)]) for i in range(n)]
            prompts = [scheduler.prompts.build(r.text, r.speaker, r.language) for r in requests]
            kv_len = max(p.shape[0] for p in prompts) + steps * (repeat + 2) + 8
            new_ms, compiled_ms, old_ms, plain_ms = [], [], [], []
            for _ in range(repeat):  # interleaved, so drift hits all alike
                for step, times in ((fs.frame_step, new_ms), (compiled, compiled_ms)):
                    if step is None:
                        continue
                    with torch.inference_mode():
                        fs.prefill(w, s, list(range(n)), prompts, [scheduler.sampling_params(i) for i in range(n)])
                    times.append(ms_per_step(step, w, s, n, kv_len, steps, device.type))

                old = Wave1Step(engine)
                with torch.inference_mode():
                    old.admit(requests)
                    for row in old._rows:
                        row.budget = 10**9
                    old.step()
                    sync(device.type)
                    started = time.perf_counter()
                    for _ in range(steps):
                        old.step()
                    sync(device.type)
                old_ms.append((time.perf_counter() - started) / steps * 1000)

                # Plain qwen-tts: the difference between 2x and 1x `steps` frames, so its prompt and
                # decoding cancel out.
                walls = []
                for frames in (steps, 2 * steps):
                    sync(device.type)
                    started = time.perf_counter()
                    engine.model.generate_custom_voice(
                        text=[r.text for r in requests],
                        speaker=[r.speaker for r in requests],
                        language=[r.language for r in requests],
                        do_sample=False,
                        subtalker_dosample=False,
                        max_new_tokens=frames + 1,
                    )
                    sync(device.type)
                    walls.append(time.perf_counter() - started)
                plain_ms.append((walls[1] - walls[0]) / steps * 1000)
            row = {
                "batch": n,
                "new_ms": statistics.median(new_ms),
                "old_ms": statistics.median(old_ms),
                "plain_ms": statistics.median(plain_ms),
            }
            row["vs_old"] = row["old_ms"] / row["new_ms"]
            row["vs_plain"] = row["plain_ms"] / row["new_ms"]
            if compiled_ms:
                row["compiled_ms"] = statistics.median(compiled_ms)
                row["compiled_vs_old"] = row["old_ms"] / row["compiled_ms"]
                row["compiled_vs_plain"] = row["plain_ms"] / row["compiled_ms"]
            rows.append(row)
    finally:
        hook.remove()
    return rows


def step_table(rows: list[dict[str, Any]], label: str, steps: int, repeat: int) -> str:
    lines: list[str] = []
    emit = lines.append
    emit(f"\n## Frame step: {label}, ms per frame (median of {repeat} runs of {steps} steps), greedy\n")
    emit("'new' = frame_step, eager; 'wave 1' = the streaming loop's _step (HF generate inside); 'plain' =")
    emit("qwen-tts generate_custom_voice, per frame (difference of two lengths). Speed-up = their time / new.\n")
    emit("| batch | new ms | wave 1 ms | plain qwen-tts ms | new vs wave 1 | new vs plain |")
    emit("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        emit(
            f"| {r['batch']} | {r['new_ms']:.1f} | {r['old_ms']:.1f} | {r['plain_ms']:.1f} | "
            f"{r['vs_old']:.2f}x | {r['vs_plain']:.2f}x |"
        )
    if rows and "compiled_ms" in rows[0]:
        emit("\nThe same frame step compiled (`TTS_COMPILE_STEP`: Inductor, dynamic shapes), same run:\n")
        emit("| batch | compiled ms | eager ms | compiled vs eager | compiled vs wave 1 | compiled vs plain |")
        emit("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            emit(
                f"| {r['batch']} | {r['compiled_ms']:.1f} | {r['new_ms']:.1f} | "
                f"{r['new_ms'] / r['compiled_ms']:.2f}x | {r['compiled_vs_old']:.2f}x | {r['compiled_vs_plain']:.2f}x |"
            )
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(
        args,
        cuda_graphs=False,
        max_batch_size=max(args.batch_sizes),
        max_new_tokens=args.steps * (args.repeat + 4),
        max_prompt_tokens=256,
    )
    engine = TTSEngine.load(settings)
    compiled = None
    if args.compiled:
        compiled = CompiledFrameStep()
        seconds = compiled.warm_up(engine.scheduler.weights, engine.scheduler.state, False, None)
    rows = measure_step(engine, args.batch_sizes, args.steps, args.repeat, compiled)
    label = f"{model_label(args)}, {engine.model.model.dtype} on {engine.model.device}"
    result = {"kind": "step", "model": model_label(args), "label": label, "env": environment(), "rows": rows}
    if compiled is not None:
        result["compile_s"] = seconds
    return {**result, "steps": args.steps, "repeat": args.repeat}


def report(result: dict[str, Any]) -> str:
    table = step_table(result["rows"], result["label"], result["steps"], result["repeat"])
    if "compile_s" in result:
        table += f"\n\nCompile and warm-up: {result['compile_s']:.0f} s."
    return table
