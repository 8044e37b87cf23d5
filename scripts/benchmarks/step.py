"""The frame step alone: the step engine's `frame_step` against wave 1's step (qwen-tts's talker forward with
HF `generate` for the code predictor, on a shared DynamicCache) and against plain qwen-tts
`generate_custom_voice`, per frame, at several batch sizes, interleaved in one run.

    python scripts/bench.py step --arch deep              # the released layer counts at tiny widths (CPU)
    python scripts/bench.py step --arch deep --compiled   # also the step compiled with Inductor (minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks.baseline_step import Wave1Step
from benchmarks.common import VOICES, bench_settings, environment, model_label, ms_per_step, sync
from tts_service import frame_step as fs
from tts_service.dev.tiny_checkpoint import CODEC_EOS
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.sampling import SamplerPlan, SamplingParams
from tts_service.step_compiler import CompiledFrameStep

TEXT = "The east wing of the gallery opens at nine. Please keep to the marked paths and ask any guide."


@contextlib.contextmanager
def eos_never(engine: TTSEngine) -> Iterator[None]:
    """Plain qwen-tts never ends a line, so every run generates the frames asked for."""
    hook = engine.model.model.talker.codec_head.register_forward_hook(
        lambda _m, _i, out: out.index_fill(-1, torch.tensor([CODEC_EOS], device=out.device), -1e4)
    )
    try:
        yield
    finally:
        hook.remove()


def measure_step(
    engine: TTSEngine, batch_sizes: list[int], steps: int, repeat: int, compiled: CompiledFrameStep | None = None
) -> list[dict[str, Any]]:
    """Milliseconds per frame for each batch size: new step (eager, and compiled when given), wave 1's
    step, plain qwen-tts; and the new step without its products' row padding (`TTS_BATCH_INVARIANT=false`)
    when the engine pads, and (below the padding's row count) with the step's window widened to that many
    rows instead: free slots compute beside the batch, so no product needs padding (the batch's frames are
    checked equal to the padded step's); the engine's own path (widened, else padded) with the weights
    copied into the other layout (`batch_invariance`: contiguous [in, out] against transposed views); and
    the engine's path at each other row padding it could have chosen (`fs.INVARIANT_ROW_PADDINGS`, same
    layout), with whether that padding keeps a row's bits on this CPU."""
    scheduler = engine.scheduler
    w, s = scheduler.weights, scheduler.state
    unpadded = relaid = None
    paddings: dict[int, fs.Weights] = {}
    if w.talker.min_rows > 1:
        unpadded = padded_to(w, 1)
        relaid = other_layout(w)
        paddings = {p: padded_to(w, p) for p in fs.INVARIANT_ROW_PADDINGS if p != w.talker.min_rows and p <= s.slots}
    holds = {p: padding_holds(scheduler, p) for p in paddings}  # a property of the CPU: once, not per batch
    device = w.codec_head.device
    rows = []
    with eos_never(engine):
        for n in batch_sizes:
            requests = [SynthesisRequest(TEXT, *VOICES[i % len(VOICES)]) for i in range(n)]
            prompts = [scheduler.prompts.build(r.text, r.speaker, r.language) for r in requests]
            kv_len = max(p.shape[0] for p in prompts) + steps * (repeat + 2) + 8
            new_ms, compiled_ms, old_ms, plain_ms, unpadded_ms, widened_ms, relaid_ms = [], [], [], [], [], [], []
            padding_ms: dict[int, list[float]] = {p: [] for p in paddings}
            widened = w.talker.min_rows if unpadded is not None and n < w.talker.min_rows <= s.slots else n
            for _ in range(repeat):  # interleaved, so drift hits all alike
                variants = (
                    (fs.frame_step, w, new_ms, n),
                    (compiled, w, compiled_ms, n),
                    (fs.frame_step, unpadded, unpadded_ms, n),
                    (fs.frame_step if widened > n else None, w, widened_ms, widened),
                    (fs.frame_step, relaid, relaid_ms, widened),
                    *((fs.frame_step, paddings[p], padding_ms[p], max(n, p)) for p in paddings),
                )
                for step, weights, times, window in variants:
                    if step is None or weights is None:
                        continue
                    with torch.inference_mode():
                        fs.prefill(
                            weights, s, list(range(n)), prompts, [scheduler.sampling_params(i) for i in range(n)]
                        )
                    times.append(ms_per_step(step, weights, s, window, kv_len, steps, device.type))
                if widened > n:
                    assert widened_frames_equal(scheduler, prompts, n, widened, kv_len)

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

                plain_ms.append(plain_ms_per_frame(engine, requests, steps, sample=False))
            row = {
                "batch": n,
                "new_ms": statistics.median(new_ms),
                "old_ms": statistics.median(old_ms),
                "plain_ms": statistics.median(plain_ms),
            }
            row["vs_old"] = row["old_ms"] / row["new_ms"]
            row["vs_plain"] = row["plain_ms"] / row["new_ms"]
            if unpadded_ms:
                row["unpadded_ms"] = statistics.median(unpadded_ms)
                row["padded_rows"] = w.talker.min_rows
            if widened_ms:
                row["widened_ms"] = statistics.median(widened_ms)
            if relaid_ms or padding_ms:
                row["engine_ms"] = row.get("widened_ms", row["new_ms"])
            if relaid_ms:
                row["relaid_ms"] = statistics.median(relaid_ms)
                row["contiguous"] = w.codec_head_t.is_contiguous()
            if padding_ms:
                row["padded_rows"] = w.talker.min_rows
                row["paddings"] = {p: statistics.median(times) for p, times in padding_ms.items()}
                row["padding_holds"] = holds
            if compiled_ms:
                row["compiled_ms"] = statistics.median(compiled_ms)
                row["compiled_vs_old"] = row["old_ms"] / row["compiled_ms"]
                row["compiled_vs_plain"] = row["plain_ms"] / row["compiled_ms"]
            rows.append(row)
    return rows


def padded_to(w: fs.Weights, rows: int) -> fs.Weights:
    """The same weights, their products padded to `rows` rows."""
    talker, predictor = (dataclasses.replace(stack, min_rows=rows) for stack in (w.talker, w.predictor))
    return dataclasses.replace(w, talker=talker, predictor=predictor)


def padding_holds(scheduler: Any, rows: int) -> bool:
    """Whether padding to `rows` in the engine's layout keeps every row's bits up to its slots on this CPU."""
    from tts_service.batch_invariance import ProductLayout, rows_keep_their_bits

    layout = ProductLayout(scheduler.invariance.contiguous_weights, rows)
    return rows_keep_their_bits(fs.product_shapes(scheduler.model), layout, scheduler.state.slots, threads=1)


def widened_frames_equal(scheduler: Any, prompts: list[torch.Tensor], n: int, window: int, kv_len: int) -> bool:
    """The batch's frames over 3 steps, computed in a window of `window` rows (free slots beside them), equal
    those of the step over its own n rows with padded products."""
    w, s = scheduler.weights, scheduler.state
    runs = []
    for rows in (n, window):
        with torch.inference_mode():
            fs.prefill(w, s, list(range(n)), prompts, [scheduler.sampling_params(i) for i in range(n)])
            runs.append([fs.frame_step(w, s, rows, kv_len, False)[0][:n].clone() for _ in range(3)])
    return all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def other_layout(w: fs.Weights) -> fs.Weights:
    """The step's weights copied into the other layout: contiguous [in, out] <-> transposed views."""

    def flip(t: torch.Tensor) -> torch.Tensor:
        return t.t().contiguous().t() if t.is_contiguous() else t.contiguous()

    def stack(s: fs.Stack) -> fs.Stack:
        layers = [
            dataclasses.replace(
                layer,
                qkv_t=flip(layer.qkv_t),
                o_t=flip(layer.o_t),
                gate_up_t=flip(layer.gate_up_t),
                down_t=flip(layer.down_t),
            )
            for layer in s.layers
        ]
        return dataclasses.replace(s, layers=layers)

    return dataclasses.replace(
        w,
        talker=stack(w.talker),
        predictor=stack(w.predictor),
        codec_head_t=flip(w.codec_head_t),
        predictor_heads_t=[flip(t) for t in w.predictor_heads_t],
        projection_t=None if w.projection_t is None else flip(w.projection_t),
    )


def plain_ms_per_frame(engine: TTSEngine, requests: list[SynthesisRequest], steps: int, sample: bool) -> float:
    """Plain qwen-tts `generate_custom_voice` per frame: the difference between 2x and 1x `steps` frames,
    so its prompt and decoding cancel out (end of speech must be suppressed)."""
    device = engine.model.device.type if hasattr(engine.model.device, "type") else str(engine.model.device)
    walls = []
    for frames in (steps, 2 * steps):
        sync(device)
        started = time.perf_counter()
        engine.model.generate_custom_voice(
            text=[r.text for r in requests],
            speaker=[r.speaker for r in requests],
            language=[r.language for r in requests],
            do_sample=sample,
            subtalker_dosample=sample,
            max_new_tokens=frames + 1,
        )
        sync(device)
        walls.append(time.perf_counter() - started)
    return (walls[1] - walls[0]) / steps * 1000


def measure_sampling(engine: TTSEngine, batch_sizes: list[int], steps: int, repeat: int) -> list[dict[str, Any]]:
    """Milliseconds per frame with qwen-tts's own sampling settings (its generation_config: top-k 50,
    temperature 0.9, top-p 1): sampled over the whole vocabulary, over the top-k candidates (what the
    service runs), and greedy, interleaved."""
    scheduler = engine.scheduler
    w, s = scheduler.weights, scheduler.state
    qwen = engine.model._merge_generate_kwargs()
    params = SamplingParams(
        do_sample=True,
        temperature=float(qwen["temperature"]),
        top_k=int(qwen["top_k"] or 0),
        top_p=float(qwen["top_p"]),
        repetition_penalty=float(qwen["repetition_penalty"] or 1.0),
        sub_do_sample=True,
        sub_temperature=float(qwen["subtalker_temperature"]),
        sub_top_k=int(qwen["subtalker_top_k"] or 0),
        sub_top_p=float(qwen["subtalker_top_p"]),
        seed=0,
    )
    plans = {"whole": SamplerPlan(), "candidates": SamplerPlan.of(params)}
    kept = w.sampler
    rows = []
    try:
        for n in batch_sizes:
            requests = [SynthesisRequest(TEXT, *VOICES[i % len(VOICES)]) for i in range(n)]
            prompts = [scheduler.prompts.build(r.text, r.speaker, r.language) for r in requests]
            kv_len = max(p.shape[0] for p in prompts) + steps * 2 + 8
            times: dict[str, list[float]] = {"whole": [], "candidates": [], "greedy": []}
            plain: list[float] = []
            for _ in range(repeat):
                with eos_never(engine):
                    plain.append(plain_ms_per_frame(engine, requests, steps, sample=True))
                for name, times_of in times.items():
                    w.sampler = plans.get(name, kept)
                    with torch.inference_mode():
                        seeded = [dataclasses.replace(params, seed=i) for i in range(n)]
                        fs.prefill(w, s, list(range(n)), prompts, seeded)
                    device = w.codec_head.device.type
                    times_of.append(ms_per_step(fs.frame_step, w, s, n, kv_len, steps, device, sample=name != "greedy"))
            row = {"batch": n, **{f"{name}_ms": statistics.median(t) for name, t in times.items()}}
            row["plain_ms"] = statistics.median(plain)
            row["speedup"] = row["whole_ms"] / row["candidates_ms"]
            row["vs_plain"] = row["plain_ms"] / row["candidates_ms"]
            row["candidates"] = plans["candidates"].candidates
            rows.append(row)
    finally:
        w.sampler = kept
    return rows


def sampling_table(rows: list[dict[str, Any]]) -> str:
    candidates = rows[0]["candidates"]
    lines = [
        "\nWith qwen-tts's sampling settings, same run: ms per frame, eager, sampled over the whole vocabulary",
        f"against over each row's top {candidates} logits (the service's path), greedy, and plain qwen-tts sampled:\n",
        "| batch | whole vocabulary ms | top candidates ms | speed-up | greedy ms | plain qwen-tts sampled ms | "
        "candidates vs plain |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = [str(r["batch"]), f"{r['whole_ms']:.1f}", f"{r['candidates_ms']:.1f}", f"{r['speedup']:.2f}x"]
        cells += [f"{r['greedy_ms']:.1f}", f"{r['plain_ms']:.1f}", f"{r['vs_plain']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(title: str, header: list[str], cells: list[list[str]]) -> list[str]:
    """A titled markdown table, its columns right-aligned."""
    rule = "| " + " | ".join("---:" for _ in header) + " |"
    return [title, "| " + " | ".join(header) + " |", rule, *("| " + " | ".join(row) + " |" for row in cells)]


def step_table(rows: list[dict[str, Any]], label: str, steps: int, repeat: int) -> str:
    lines = [
        f"\n## Frame step: {label}, ms per frame (median of {repeat} runs of {steps} steps), greedy\n",
        "'new' = frame_step, eager; 'wave 1' = the streaming loop's _step (HF generate inside); 'plain' =",
    ]
    lines += _markdown(
        "qwen-tts generate_custom_voice, per frame (difference of two lengths). Speed-up = their time / new.\n",
        ["batch", "new ms", "wave 1 ms", "plain qwen-tts ms", "new vs wave 1", "new vs plain"],
        [
            [str(r["batch"]), f"{r['new_ms']:.1f}", f"{r['old_ms']:.1f}", f"{r['plain_ms']:.1f}"]
            + [f"{r['vs_old']:.2f}x", f"{r['vs_plain']:.2f}x"]
            for r in rows
        ],
    )
    if rows and "unpadded_ms" in rows[0]:
        lines += _markdown(
            f"\nWhat batch invariance costs (`TTS_BATCH_INVARIANT`: products over at least {rows[0]['padded_rows']} "
            "rows), same run:\n",
            ["batch", "new ms (padded)", "new ms, unpadded", "padded / unpadded", "window widened instead ms"],
            [
                [
                    str(r["batch"]),
                    f"{r['new_ms']:.1f}",
                    f"{r['unpadded_ms']:.1f}",
                    f"{r['new_ms'] / r['unpadded_ms']:.2f}x",
                    f"{r['widened_ms']:.1f}" if "widened_ms" in r else "-",
                ]
                for r in rows
            ],
        )
    if rows and "relaid_ms" in rows[0]:
        held, other = (
            ("contiguous", "transposed views") if rows[0]["contiguous"] else ("transposed views", "contiguous")
        )
        lines += _markdown(
            f"\nThe weights' layout (`batch_invariance` chose {held} on this CPU), the engine's path, same run:\n",
            ["batch", f"{held} ms", f"{other} ms", f"{other} / {held}"],
            [
                [
                    str(r["batch"]),
                    f"{r['engine_ms']:.1f}",
                    f"{r['relaid_ms']:.1f}",
                    f"{r['relaid_ms'] / r['engine_ms']:.2f}x",
                ]
                for r in rows
            ],
        )
    if rows and "paddings" in rows[0]:
        chosen = rows[0]["padded_rows"]
        others = sorted(rows[0]["paddings"])
        verdicts = ", ".join(f"{p} rows {'holds' if rows[0]['padding_holds'][p] else 'does not hold'}" for p in others)
        lines += _markdown(
            f"\nThe row padding (`batch_invariance` chose {chosen} rows on this CPU; in its layout, {verdicts}), "
            "the engine's path, same run:\n",
            ["batch", f"{chosen} rows ms", *(f"{p} rows ms" for p in others), *(f"{p} / {chosen}" for p in others)],
            [
                [str(r["batch"]), f"{r['engine_ms']:.1f}"]
                + [f"{r['paddings'][p]:.1f}" for p in others]
                + [f"{r['paddings'][p] / r['engine_ms']:.2f}x" for p in others]
                for r in rows
            ],
        )
    if rows and "compiled_ms" in rows[0]:
        lines += _markdown(
            "\nThe same frame step compiled (`TTS_COMPILE_STEP`: Inductor, dynamic shapes), same run:\n",
            ["batch", "compiled ms", "eager ms", "compiled vs eager", "compiled vs wave 1", "compiled vs plain"],
            [
                [
                    str(r["batch"]),
                    f"{r['compiled_ms']:.1f}",
                    f"{r['new_ms']:.1f}",
                    f"{r['new_ms'] / r['compiled_ms']:.2f}x",
                ]
                + [f"{r['compiled_vs_old']:.2f}x", f"{r['compiled_vs_plain']:.2f}x"]
                for r in rows
            ],
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
    sampling = measure_sampling(engine, args.batch_sizes, args.steps, args.repeat)
    label = f"{model_label(args)}, {engine.model.model.dtype} on {engine.model.device}"
    result = {"kind": "step", "model": model_label(args), "label": label, "env": environment(), "rows": rows}
    result["sampling"] = sampling
    if compiled is not None:
        result["compile_s"] = seconds
    return {**result, "steps": args.steps, "repeat": args.repeat}


def report(result: dict[str, Any]) -> str:
    table = step_table(result["rows"], result["label"], result["steps"], result["repeat"])
    if result.get("sampling"):
        table += "\n" + sampling_table(result["sampling"])
    if "compile_s" in result:
        table += f"\n\nCompile and warm-up: {result['compile_s']:.0f} s."
    return table
