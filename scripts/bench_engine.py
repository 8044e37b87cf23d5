"""The step engine in-process, side by side with plain qwen-tts: time to first audio, real-time factor,
throughput under staggered streams, the frame step's kernel and sync census, graphs against eager.

    python scripts/bench_engine.py --arch 1.7b --device cuda            # random weights, real sizes
    python scripts/bench_engine.py --arch 1.7b --device cuda --kernel-forms   # + the step's forms side by side
    python scripts/bench_engine.py --arch deep --device cpu --streams 1 4
    python scripts/bench_engine.py --arch 1.7b --device cuda --compile-step   # the compiled step, graphed

End of speech is suppressed, so every request generates exactly `--frames` frames (12.5 = 1 s).
Prints markdown tables; `--json FILE` also writes the raw figures, rewritten after each part (most important
first: graphs against eager and the census, the streams, plain qwen-tts, the prefill and the step, the
kernel forms), so that a run cut off by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.common import ms_per_step, sync  # noqa: E402
from benchmarks.workload import FRAME_RATE, TEXT, VOICES  # noqa: E402
from census import census  # noqa: E402

from tts_service import chunk_decoder, fused_kernels  # noqa: E402
from tts_service import frame_step as fs  # noqa: E402
from tts_service.cuda_graphs import bucket_for, kv_buckets  # noqa: E402
from tts_service.dev.tiny_checkpoint import CODEC_EOS, ensure_tiny_checkpoint  # noqa: E402
from tts_service.engine import TTSEngine  # noqa: E402
from tts_service.invariance_plan import InvariancePlan  # noqa: E402
from tts_service.request_handle import Job  # noqa: E402
from tts_service.sampling import SamplerPlan, SamplingParams  # noqa: E402
from tts_service.scheduler import LOOP_PHASES, TIMED_KEYS, StepScheduler, rows_at  # noqa: E402
from tts_service.settings import Settings  # noqa: E402
from tts_service.stream_plan import ChunkPlan, window_lengths  # noqa: E402

logger = logging.getLogger("bench_engine")


def job(index: int, frames: int, plan: ChunkPlan) -> Job:
    speaker, language = VOICES[index % len(VOICES)]
    return Job((TEXT,), speaker, language, "", seed=index, plan=plan, budgets=(frames,))


@dataclass
class StreamTiming:
    submitted: float
    first_audio: float | None = None
    ended: float | None = None
    samples: int = 0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, samples) of each chunk

    def stalls(self, sample_rate: int = 24000) -> list[float]:
        """Seconds a listener who starts playing at the first chunk waits, each time the audio in hand
        runs out before the next chunk arrives (then resumes with it)."""
        waits, clock, in_hand = [], 0.0, 0.0  # clock: when what was in hand runs out
        for arrival, samples in self.chunks:
            if in_hand and arrival > clock:
                waits.append(arrival - clock)
            clock = max(clock, arrival) + samples / sample_rate
            in_hand += samples
        return waits


def run_streams(scheduler: StepScheduler, count: int, frames: int, stagger_s: float, plan: ChunkPlan) -> dict:
    """Submit `count` streams `stagger_s` apart and time each one's first chunk and end."""
    timings: list[StreamTiming] = []
    threads = []

    def consume(handle, timing: StreamTiming) -> None:
        for chunk in handle:
            arrived = time.perf_counter()
            if timing.first_audio is None:
                timing.first_audio = arrived
            timing.samples += len(chunk)
            timing.chunks.append((arrived, len(chunk)))
        timing.ended = time.perf_counter()

    scheduler.reset_time_accounting()
    started = time.perf_counter()
    handles = []
    for index in range(count):
        timing = StreamTiming(time.perf_counter())
        handle = scheduler.submit(job(index, frames, plan), f"bench-{index}-{time.monotonic_ns()}")
        handles.append(handle)
        thread = threading.Thread(target=consume, args=(handle, timing))
        thread.start()
        threads.append(thread)
        timings.append(timing)
        if stagger_s and index + 1 < count:
            time.sleep(stagger_s)
    for thread in threads:
        thread.join()
    wall = max(t.ended for t in timings) - started
    audio = sum(t.samples for t in timings) / 24000
    ttfa = sorted((t.first_audio - t.submitted) * 1000 for t in timings)
    rtf = [t.samples / 24000 / (t.ended - t.submitted) for t in timings]
    stalls = [t.stalls() for t in timings]
    return {
        "streams": count,
        "frames": frames,
        "audio_s": audio,
        "wall_s": wall,
        "audio_s_per_s": audio / wall,
        "ttfa_p50_ms": statistics.median(ttfa),
        "ttfa_p95_ms": ttfa[min(len(ttfa) - 1, int(0.95 * len(ttfa)))],
        "rtf_min": min(rtf),
        "rtf_median": statistics.median(rtf),
        "batch_max": max(scheduler.step_batch_sizes, default=0),
        "streams_ran_dry": sum(1 for waits in stalls if waits),
        "stalls": sum(len(waits) for waits in stalls),
        "stall_ms_worst_stream": 1000 * max(sum(waits) for waits in stalls),
        "first_audio_ms": first_audio_breakdown([h.timeline for h in handles]),
        "loop_s": dict(scheduler.loop_seconds),
        "decoder_busy_s": scheduler.decoder.busy_seconds,
    }


FIRST_AUDIO_PHASES = (  # (label, from, to) in a handle's timeline
    ("to prefill", "submitted", "prefilled"),
    ("prefill to first frame", "prefilled", "first_frame"),
    ("first frame to first chunk", "first_frame", "first_window"),
    ("chunk decode and hand-off", "first_window", "first_audio"),
)


def first_audio_breakdown(timelines: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds of each phase of the time to first audio (see RequestHandle.timeline)."""
    return {
        label: statistics.median(1000 * (t[end] - t[start]) for t in timelines)
        for label, start, end in FIRST_AUDIO_PHASES
    }


def plain_qwen_tts(engine: TTSEngine, batch: int, frames: int, device: str, sample: bool = False) -> dict:
    """qwen-tts's own generate_custom_voice on the same text, `frames` frames per item, greedy unless
    `sample` (then with its own sampling settings, as the engine's)."""
    voices = [VOICES[i % len(VOICES)] for i in range(batch)]
    kwargs = dict(do_sample=sample, subtalker_dosample=sample, max_new_tokens=frames + 1)
    engine.model.generate_custom_voice(
        text=[TEXT], speaker=["ryan"], language=["english"], **{**kwargs, "max_new_tokens": 3}
    )
    sync(device)
    started = time.perf_counter()
    wavs, _ = engine.model.generate_custom_voice(
        text=[TEXT] * batch, speaker=[v[0] for v in voices], language=[v[1] for v in voices], **kwargs
    )
    sync(device)
    wall = time.perf_counter() - started
    audio = sum(len(w) for w in wavs) / 24000
    return {"batch": batch, "frames": frames, "wall_s": wall, "audio_s": audio, "rtf_per_stream": audio / batch / wall}


def cuda_kernels(run: Any, device: str) -> Counter:
    """The CUDA kernels `run()` launches, by name, as the profiler sees them (the GPU is synchronized before
    and after)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync(device)
    return Counter(e.name for e in prof.events() if e.device_type.name == "CUDA")


def step_census(scheduler: StepScheduler, n: int, device: str) -> dict:
    """Ops, kernels and syncs of one eager frame step at batch n, plus CUDA kernels seen by the profiler."""
    w, s = scheduler.weights, scheduler.state
    out: dict[str, Any] = {"batch": n}
    with torch.inference_mode():
        fs.frame_step(w, s, n, 256, True)
        with census() as counted:
            fs.frame_step(w, s, n, 256, True)
        out.update(
            ops=counted.ops, kernel_ops=counted.kernels, syncs=counted.syncs, python_tensors=counted.python_tensors
        )
        if device.startswith("cuda"):
            out["cuda_kernels_eager"] = cuda_kernels(lambda: fs.frame_step(w, s, n, 256, True), device).total()
            step = scheduler.step_fn
            if not isinstance(step, type(fs.frame_step)):
                step(w, s, n, 256, True)
                out["cuda_kernels_graph"] = cuda_kernels(lambda: step(w, s, n, 256, True), device).total()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    scheduler.step_fn(w, s, n, 256, True)
                out["sync_debug_error_mode"] = "clean"
            except RuntimeError as exc:
                out["sync_debug_error_mode"] = f"raised: {exc}"[:200]
            finally:
                torch.cuda.set_sync_debug_mode(0)
    return out


def triton_kernel_bits(device: str, dtype: torch.dtype, rows: int = 32) -> dict[str, float]:
    """The Triton kernels against qwen-tts's own modules (its RMSNorms, apply_rotary_pos_emb, SiLU * up) on
    random tensors at the 1.7B talker's sizes, one token per row at random positions: the share of elements
    with the same bits. The kernels round where qwen-tts's ops do and sum in torch's order for a lone
    request, so the modules run row by row; a GPU rounds to nearest as torch does."""
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSRMSNorm, apply_rotary_pos_emb

    generator = torch.Generator(device=device).manual_seed(0)
    heads, kv_heads, d, positions, width = 16, 8, 128, 512, 6144

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    def alone(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The module row by row, as qwen-tts runs a lone request's step (torch's order of sums depends on
        the rows a call has; the kernels take a lone request's)."""
        return torch.cat([module(row[None]) for row in x])

    qkv = rand(rows, (heads + 2 * kv_heads) * d)
    norms = [Qwen3TTSRMSNorm(d, eps=1e-6).to(device, dtype) for _ in range(2)]
    for module in norms:
        module.weight.data = 1 + rand(d) / 4
    angles = torch.arange(positions, device=device)[:, None] / 1e6 ** (torch.arange(0, d, 2, device=device) / d)
    cos, sin = (f(torch.cat([angles, angles], dim=-1)).to(dtype) for f in (torch.cos, torch.sin))
    flipped = torch.cat([-sin[:, : d // 2], sin[:, d // 2 :]], dim=-1)
    at = torch.randint(0, positions, (rows,), generator=generator, device=device)
    keys, values = (torch.zeros(rows, kv_heads, positions, d, dtype=dtype, device=device) for _ in range(2))
    weight = torch.cat([norms[0].weight.expand(heads, -1), norms[1].weight.expand(kv_heads, -1)]).detach()
    with torch.inference_mode():
        q = fused_kernels.qk_norm_rope_into_cache(
            qkv, 1, weight, cos, flipped, at, 0, keys, values, heads, kv_heads, 1e-6
        )
        x = qkv.view(rows, 1, heads + 2 * kv_heads, d)
        q_ref = alone(norms[0], x[:, :, :heads]).transpose(1, 2)
        k_ref = alone(norms[1], x[:, :, heads : heads + kv_heads]).transpose(1, 2)
        q_ref, k_ref = apply_rotary_pos_emb(q_ref, k_ref, cos[at][:, None], sin[at][:, None])
        gate_up = rand(rows, 2 * width)
        gate, up = gate_up.split(width, dim=-1)
        hidden = rand(rows, 2048)
        layer_norm = Qwen3TTSRMSNorm(2048, eps=1e-6).to(device, dtype)
        layer_norm.weight.data = 1 + rand(2048) / 4
        pairs = {
            "rms_norm": (
                fused_kernels.rms_norm(hidden, layer_norm.weight.detach(), 1e-6, 1),
                alone(layer_norm, hidden),
            ),
            "q": (q, q_ref),
            "k": (keys[torch.arange(rows, device=device), :, at], k_ref[:, :, 0]),
            "silu_mul": (fused_kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up),
        }
        return {name: float((got == ref).float().mean()) for name, (got, ref) in pairs.items()}


def step_part_bits(
    device: str, dtype: torch.dtype, batches: tuple[int, ...] = (1, 8, 32), triton: bool = False
) -> dict[str, dict]:
    """The step's parts that are not Triton kernels against qwen-tts's ops for each row alone, at the 1.7B
    talker's sizes on random tensors: the fused QKV and gate/up products (one GEMM each, where qwen-tts runs
    three and two, M = 1) and the fewer forms' decode attention (256 cache positions of which 100 are live,
    an additive mask, each KV head's queries as one block; HF's SDPA runs the live ones, no mask, with
    enable_gqa); with `triton`, the Triton decode attention over the live keys too. The share of elements
    with the same bits at each batch: where the Triton kernels keep qwen-tts's bits, these say which part
    makes the codes part first."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    generator = torch.Generator(device=device).manual_seed(1)
    hidden, heads, kv_heads, d, width, slots, live = 2048, 16, 8, 128, 6144, 256, 100

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    projections = [rand(rows, hidden, scale=hidden**-0.5) for rows in (heads * d, kv_heads * d, kv_heads * d)]
    gate_up = [rand(width, hidden, scale=hidden**-0.5) for _ in range(2)]
    fused = {"fused QKV product": torch.cat(projections).t(), "fused gate/up product": torch.cat(gate_up).t()}
    separate = {"fused QKV product": projections, "fused gate/up product": gate_up}
    stack = SimpleNamespace(fewer_kernels=True, heads=heads, kv_heads=kv_heads, head_dim=d)
    attentions = ["decode attention", *(["Triton decode attention"] if triton else [])]
    shares: dict[str, dict] = {name: {} for name in [*fused, *attentions]}
    with torch.inference_mode():
        for n in batches:
            x = rand(n, hidden)
            for name, weight_t in fused.items():
                alone = torch.cat(
                    [torch.cat([F.linear(x[i : i + 1], w) for w in separate[name]], -1) for i in range(n)]
                )
                shares[name][n] = float((fs.linear(x, weight_t) == alone).float().mean())
            q, keys, values = rand(n, heads, 1, d), rand(n, kv_heads, slots, d), rand(n, kv_heads, slots, d)
            mask = torch.full((n, 1, 1, slots), float("-inf"), dtype=dtype, device=device)
            mask[..., :live] = 0.0
            ours = fs._attend_decode(q, keys, values, stack, mask)
            alone = torch.cat([
                F.scaled_dot_product_attention(
                    q[i : i + 1], keys[i : i + 1, :, :live], values[i : i + 1, :, :live], scale=d**-0.5, enable_gqa=True
                )
                for i in range(n)
            ])  # fmt: skip
            shares["decode attention"][n] = float((ours == alone).float().mean())
            if triton:
                live_keys = torch.full((n,), live - 1, device=device)
                ours = fused_kernels.decode_attention(q, keys, values, live_keys, d**-0.5)
                shares["Triton decode attention"][n] = float((ours == alone).float().mean())
    return shares


def kernel_forms(scheduler: StepScheduler, device: str, frames: int = 60, rounds: int = 3) -> dict[str, Any]:
    """The frame step with qwen-tts's own ops, with the GPU's fewer-kernel forms (`Stack.fewer_kernels`) and,
    on a GPU where they work, with those and the Triton layer kernels (`Stack.triton_kernels`), first with the
    eager sampling ops and SDPA's decode attention, then with the sampling kernel too
    (`Weights.triton_sampling`), then with the decode attention over live keys too
    (`Stack.triton_attention`: the serving path in bf16), then with that attention in fewer programs looping
    over splits (`Stack.looped_attention`, the same bits), side by side: kernels per frame (and on a GPU the
    most frequent kernels' names, which tell the attention backend), the step's time (as CUDA graphs on a
    GPU) at batch 1, 8 and 32, greedy and sampled with qwen-tts's sampling settings (the service's default;
    median of `rounds`, the forms alternating); at the widest batch sampled also with the rows at staggered
    lengths (`staggered_keys`, 100 to 2,000 keys), where SDPA attends every row up to the longest's bucket
    and the Triton attention each row's own keys (what 32 staggered streams look like); and the first frame
    where a lone greedy request's codes differ from the first form's. Returns the table's `rows` and the
    same-bits figures printed beside it (no form's own). Needs every slot free."""
    serving, s = scheduler.weights, scheduler.state
    cuda = device.startswith("cuda")
    forms = {"qwen-tts's ops": (False, False, False, False), "fewer kernels": (True, False, False, False)}
    sizes, vocabularies = fs.sizes(serving), fs.vocabularies(serving)
    dtype = serving.codec_head.dtype
    # (a CPU would run the Triton kernels in Triton's interpreter)
    layers, attention = (
        fused_kernels.usable_forms(torch.device(device), dtype, sizes, vocabularies, s.max_len)
        if cuda
        else (False, False)
    )
    if layers:
        forms["fewer + Triton layers, SDPA"] = (True, True, False, False)
        forms["fewer + Triton, SDPA"] = (True, True, True, False)
        if attention:
            forms["fewer + Triton"] = (True, True, True, True)
            forms["fewer + Triton, looped splits"] = (True, True, True, True, True)
    batches = [n for n in (1, 8, 32) if n <= s.slots]
    wide, staggered = batches[-1], staggered_keys(batches[-1], s.max_len)
    staggered_kv = bucket_for(max(staggered), kv_buckets(s.max_len))  # the bucket the service replays there
    modes = {"greedy": False, "sampled": True}
    sampled = _default_sampling(scheduler)
    rows: list[dict[str, Any]] = []
    steps: list[tuple[fs.Weights, Any, Any]] = []  # (forms, step, step at the staggered rows' bucket)
    idle_settings = _row_settings(s)
    with torch.inference_mode():
        _set_row_settings(s, sampled)  # every idle row samples as a request would
        for name, form in forms.items():
            w = replace(fs.with_fewer_kernels(serving, *form), sampler=SamplerPlan.of(sampled))
            row: dict[str, Any] = {"forms": name}
            for mode, sample in modes.items():
                fs.frame_step(w, s, 1, 256, sample)
                with census() as counted:
                    fs.frame_step(w, s, 1, 256, sample)
                row[f"kernel_ops_{mode}"] = counted.kernels
            step: Any = fs.frame_step
            wide_step: Any = fs.frame_step
            if cuda:
                from tts_service.cuda_graphs import GraphedFrameStep

                for mode, sample in modes.items():
                    names = cuda_kernels(lambda: fs.frame_step(w, s, 1, 256, sample), device)  # noqa: B023 (run now)
                    row[f"cuda_kernels_{mode}"] = names.total()
                    row[f"top_kernels_{mode}"] = [[name[:90], count] for name, count in names.most_common(12)]
                step = GraphedFrameStep(w, s, batches, [256])
                step.capture_all()
                wide_step = GraphedFrameStep(w, s, [wide], [staggered_kv])
                wide_step.capture_all()
            rows.append(row)
            steps.append((w, step, wide_step))
        times: list[dict[tuple[str, int], list[float]]] = [{} for _ in steps]
        for _ in range(rounds):
            for (w, step, wide_step), timed in zip(steps, times, strict=True):
                # Every row as a request with TIMED_KEYS keys: SDPA's forms attend the 256 under a mask, the
                # Triton attention the live ones, so both read as much as a request there would.
                with rows_at(s, TIMED_KEYS):
                    for mode, sample in modes.items():
                        for n in batches:
                            ms = ms_per_step(step, w, s, n, 256, 20, device, warm=3, sample=sample)
                            timed.setdefault((mode, n), []).append(ms)
                with rows_at(s, staggered):
                    ms = ms_per_step(wide_step, w, s, wide, staggered_kv, 20, device, warm=3, sample=True)
                    timed.setdefault(("staggered", wide), []).append(ms)
        _set_row_settings(s, idle_settings)
        prompt = scheduler.prompts.build(TEXT, *VOICES[0])
        codes = []
        for w, step, _ in steps:
            fs.prefill(w, s, [0], [prompt], [scheduler.sampling_params(0)])
            codes.append(torch.stack([step(w, s, 1, 256, False)[0][0].clone() for _ in range(frames)]).cpu())
            fs.release(s, 0)
    for row, timed in zip(rows, times, strict=True):
        row.update({f"ms_{mode}_batch_{n}": statistics.median(values) for (mode, n), values in timed.items()})
    for row, form_codes in zip(rows[1:], codes[1:], strict=True):
        differs = (codes[0] != form_codes).any(dim=1).nonzero().flatten().tolist()
        row["first_divergent_frame"] = differs[0] if differs else None
    print(
        f"\n## The step's kernel forms (keys 256, rows at {TIMED_KEYS} live keys; ms: median of {rounds}; greedy and "
        f"sampled with qwen-tts's settings; the codes of one greedy request over {frames} frames)\n"
    )
    header = " | ".join(f"ms {mode} {n}" for mode in modes for n in (1, 8, 32))
    spread = f"{min(staggered)} to {max(staggered)}" if len(set(staggered)) > 1 else str(staggered[0])
    header += f" | ms sampled {wide}, {spread} keys"
    print(f"| forms | kernel ops greedy / sampled | CUDA kernels greedy / sampled | {header} | first frame differing |")
    print("| --- | ---: | ---: |" + " ---: |" * 7 + " ---: |")
    for row in rows:
        times_ms = " | ".join(
            f"{row[f'ms_{mode}_batch_{n}']:.2f}" if f"ms_{mode}_batch_{n}" in row else "-"
            for mode in (*modes, "staggered")
            for n in ((1, 8, 32) if mode in modes else (wide,))
        )
        ops = f"{row['kernel_ops_greedy']} / {row['kernel_ops_sampled']}"
        gpu = f"{row['cuda_kernels_greedy']} / {row['cuda_kernels_sampled']}" if cuda else "-"
        print(f"| {row['forms']} | {ops} | {gpu} | {times_ms} | {row.get('first_divergent_frame', '-')} |")
    triton = "fewer + Triton" in forms
    beside: dict[str, Any] = {}
    if len(rows) > 1 and (
        parts := _beside(beside, "parts_same_bits_as_qwen_tts", step_part_bits, device, dtype, (1, 8, 32), triton)
    ):
        print("\nThe step's products and decode attention against qwen-tts's ops for each row alone (random,")
        print("1.7B sizes), same bits at batch " + " / ".join(map(str, next(iter(parts.values())))) + ": ")
        print(", ".join(f"{name} " + " / ".join(f"{v:.2%}" for v in by_n.values()) for name, by_n in parts.items()))
    if "fewer + Triton" in forms and (
        same := _beside(beside, "same_bits_as_qwen_tts", triton_kernel_bits, device, dtype)
    ):
        shares = ", ".join(f"{name} {share:.2%}" for name, share in same.items())
        print(f"\nTriton kernels against qwen-tts's modules (random, 1.7B sizes), same bits: {shares}")
    for row in rows:
        for mode in modes:
            if f"top_kernels_{mode}" in row:
                print(f"\n{row['forms']}, {mode}, most frequent kernels per frame: {row[f'top_kernels_{mode}']}")
    return {"rows": rows, **beside}


def staggered_keys(rows: int, max_len: int) -> list[int]:
    """Keys for `rows` rows spread evenly from 100 to 2,000 (within the cache): streams that started at
    different times, as 32 staggered streams are after their first seconds."""
    high = min(2000, max_len - 1)
    low = min(100, high)
    return [low + (high - low) * i // max(rows - 1, 1) for i in range(rows)]


def _beside(beside: dict[str, Any], key: str, measure: Any, *args: Any) -> dict | None:
    """A figure beside the kernel-forms table, kept in `beside` as `key`: `measure(*args)`, or None
    (logged) where it fails, since the table stands without it."""
    try:
        figures = measure(*args)
    except Exception:
        logger.exception("%s failed", measure.__name__)
        return None
    beside[key] = figures
    return figures


ROW_SETTINGS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "sub_do_sample",
    "sub_temperature",
    "sub_top_k",
    "sub_top_p",
)


def _default_sampling(scheduler: StepScheduler) -> SamplingParams:
    """qwen-tts's own sampling settings (generation_config.json; the service's default), whatever the
    scheduler was given."""
    merged = scheduler.wrapper._merge_generate_kwargs()
    return replace(
        scheduler.sampling_params(0),
        do_sample=bool(merged["do_sample"]),
        temperature=float(merged["temperature"]),
        top_k=int(merged["top_k"] or 0),
        top_p=float(merged["top_p"]),
        sub_do_sample=bool(merged["subtalker_dosample"]),
        sub_temperature=float(merged["subtalker_temperature"]),
        sub_top_k=int(merged["subtalker_top_k"] or 0),
        sub_top_p=float(merged["subtalker_top_p"]),
    )


def _row_settings(s: fs.SlotState) -> dict[str, torch.Tensor]:
    return {name: getattr(s, name).clone() for name in ROW_SETTINGS}


def _set_row_settings(s: fs.SlotState, settings: SamplingParams | dict[str, torch.Tensor]) -> None:
    """Every slot's sampling settings: one request's, or saved ones (`_row_settings`)."""
    for name in ROW_SETTINGS:
        value = settings[name] if isinstance(settings, dict) else getattr(settings, name)
        if isinstance(value, torch.Tensor):
            getattr(s, name).copy_(value)
        else:
            getattr(s, name).fill_(value)


def prefill_census(scheduler: StepScheduler, device: str, prefill=fs.prefill) -> dict:
    """What admitting one request costs (its prompt built, then prefilled into a free slot by `prefill`: eager,
    or the serving path's graphs): ops, kernels, syncs, tensors from Python data, milliseconds (median of 5),
    and on CUDA the kernels the profiler sees. Eagerly, each kernel is a launch from the host."""
    speaker, language = VOICES[0]
    params = [scheduler.sampling_params(0)]

    def admit() -> None:
        prompt = scheduler.prompts.build(TEXT, speaker, language, "", None)
        prefill(scheduler.weights, scheduler.state, [0], [prompt], params)

    out: dict[str, Any] = {
        "prefill": "eager" if prefill is fs.prefill else "graphs",
        "prompt_tokens": int(scheduler.prompts.build(TEXT, speaker, language, "", None).shape[0]),
    }
    with torch.inference_mode():
        admit()
        with census() as counted:
            admit()
        out.update(
            ops=counted.ops, kernel_ops=counted.kernels, syncs=counted.syncs, python_tensors=counted.python_tensors
        )
        times = []
        for _ in range(5):
            sync(device)
            started = time.perf_counter()
            admit()
            sync(device)
            times.append((time.perf_counter() - started) * 1000)
        out["ms"] = statistics.median(times)
        if device.startswith("cuda"):
            out["cuda_kernels"] = cuda_kernels(admit, device).total()
    fs.release(scheduler.state, 0)
    return out


def lone_first_audio_by_prefill(scheduler: StepScheduler, repeat: int = 6, frames: int = 16) -> list[dict]:
    """A lone stream's time to first audio with the prompt prefilled by the serving path's graphs and eagerly,
    alternating (`repeat` streams each), with quick start when the engine has it on. On a GPU the prefill's
    launch returns before its kernels end, so its time shows in "prefill to first frame" as much as in "to
    prefill"; the time to first audio is what counts."""
    graphed = scheduler.prefill_fn
    plan = scheduler.stream_plan
    runs: dict[str, list[dict]] = {"graphs": [], "eager": []}
    for _ in range(repeat):
        for name, prefill in (("graphs", graphed), ("eager", fs.prefill)):
            scheduler.prefill_fn = prefill
            runs[name].append(run_streams(scheduler, 1, frames, 0, plan))
    scheduler.prefill_fn = graphed
    rows = []
    for name, results in runs.items():
        row = {"prefill": name, "ttfa_p50_ms": statistics.median(r["ttfa_p50_ms"] for r in results)}
        for label, _, _ in FIRST_AUDIO_PHASES:
            row[label] = statistics.median(r["first_audio_ms"][label] for r in results)
        rows.append(row)
    print(f"\n## A lone stream's first audio by prefill, {repeat} streams each, alternating (median ms)\n")
    print("| prefill | " + " | ".join(label for label, _, _ in FIRST_AUDIO_PHASES) + " | TTFA p50 |")
    print("| --- | " + " | ".join("---:" for _ in FIRST_AUDIO_PHASES) + " | ---: |")
    for row in rows:
        phases = " | ".join(f"{row[label]:.1f}" for label, _, _ in FIRST_AUDIO_PHASES)
        print(f"| {row['prefill']} | {phases} | {row['ttfa_p50_ms']:.1f} |")
    return rows


def time_steps(
    step, scheduler: StepScheduler, n: int, kv_len: int, device: str, repeat: int = 20, sample: bool = False
) -> float:
    args = (scheduler.weights, scheduler.state, n, kv_len, repeat, device)
    return ms_per_step(step, *args, warm=3, sample=sample)


def stream_plans(
    base: ChunkPlan, ramps: list[str], first_frames: list[str] | None
) -> dict[str, tuple[ChunkPlan, bool]]:
    """The chunk plans to run side by side, by name, each with whether quick start is on: each of `ramps`
    ("ramp", "step") with each first chunk size, "quick" being the serving plan's size with quick start
    (`TTS_STREAM_QUICK_START`: 1 frame when the engine has time to spare); the serving plan's own size without
    it when None. Names carry only what varies."""
    sizes = first_frames or [str(base.first_frames)]
    plans = {}
    for ramp in ramps:
        for size in sizes:
            quick = size == "quick"
            label = "quick start" if quick else f"first {size}"
            parts = ([ramp] if len(ramps) > 1 else []) + ([label] if len(sizes) > 1 else [])
            first = base.first_frames if quick else int(size)
            plans[", ".join(parts)] = (replace(base, ramp=ramp == "ramp", first_frames=first), quick)
    return plans


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="1.7b")
    parser.add_argument("--model", default=None, help="a checkpoint folder instead of --arch")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tts_service")
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--plain-frames", type=int, default=50)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--stagger-ms", type=float, default=50)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--no-plain", action="store_true")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument(
        "--compile-step", action="store_true", help="TTS_COMPILE_STEP: Inductor at start-up (graphs capture it)"
    )
    parser.add_argument(
        "--plans",
        nargs="+",
        choices=("ramp", "step"),
        default=["ramp"],
        help="stream chunk plans to run side by side: ramp (serving: 4, 4, 8, 16, ...) or step (4, 16, 16, ...)",
    )
    parser.add_argument(
        "--first-frames",
        nargs="+",
        default=None,
        help="first chunk sizes (TTS_STREAM_FIRST_FRAMES) to run side by side with each plan, and 'quick': the "
        "setting's with quick start (TTS_STREAM_QUICK_START); default: the setting's, quick start as set",
    )
    parser.add_argument(
        "--sampling",
        action="store_true",
        help="qwen-tts's sampling settings (the service's default), for the engine and plain qwen-tts alike",
    )
    parser.add_argument(
        "--stateful-batch-rows",
        type=int,
        default=chunk_decoder.STATEFUL_BATCH_ROWS,
        help="most stateful chunks (of different requests) decoded as one batch; 1: one by one, as before",
    )
    parser.add_argument(
        "--kernel-forms",
        action="store_true",
        help="also the step with qwen-tts's ops beside the GPU's fewer-kernel forms (kernels, ms, codes)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    chunk_decoder.STATEFUL_BATCH_ROWS = args.stateful_batch_rows
    decoding = "sampled (qwen-tts's settings)" if args.sampling else "greedy"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.model or str(ensure_tiny_checkpoint(args.cache_dir, args.arch))
    settings = Settings(
        model=model,
        device=args.device,
        dtype=args.dtype,
        greedy=not args.sampling,
        max_batch_size=max(args.slots, max(args.streams)),
        max_new_tokens=max(args.frames, 64) + 8,
        max_prompt_tokens=256,
        cache_dir=args.cache_dir,
        compile_step=args.compile_step,
    )
    loaded = time.perf_counter()
    engine = TTSEngine.load(settings)
    print(
        f"engine loaded (graphs captured) in {time.perf_counter() - loaded:.1f} s; decoding {decoding}; "
        f"batch invariance (TTS_BATCH_INVARIANT): {engine.scheduler.invariance}"
    )
    if args.device.startswith("cuda"):
        print(f"GPU memory after load: {torch.cuda.memory_allocated() / 1e9:.1f} GB allocated")
    scheduler = engine.scheduler
    with torch.inference_mode():
        scheduler.weights.suppress[CODEC_EOS] = True  # every request runs exactly its frame budget
    hook = engine.model.model.talker.codec_head.register_forward_hook(
        lambda _m, _i, out: out.index_fill(-1, torch.tensor([CODEC_EOS], device=out.device), -1e4)
    )
    report: dict[str, Any] = {
        "arch": args.arch,
        "device": args.device,
        "torch": torch.__version__,
        "decoding": decoding,
        "invariance": str(engine.scheduler.invariance),
    }
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()

    def save() -> None:
        """The report so far: a run cut off by its time limit keeps what it measured (most important first)."""
        if args.json:  # (a value JSON cannot hold is written as its str rather than costing the run)
            args.json.write_text(json.dumps(report, indent=2, default=str))

    if scheduler.step_fn is not fs.frame_step:  # bf16: graphs replay the eager kernels, so codes must match
        codes, graphed, graphed_prefill = {}, scheduler.step_fn, scheduler.prefill_fn
        variants = [("graphs", graphed, graphed_prefill), ("eager", fs.frame_step, fs.prefill)]
        if graphed_prefill is not fs.prefill:  # a prompt padded to its bucket may round otherwise: kept apart
            variants.insert(1, ("graphs, eager prefill", graphed, fs.prefill))
        for name, step, prefill in variants:
            scheduler.step_fn, scheduler.prefill_fn = step, prefill
            handle = scheduler.submit(job(0, 60, scheduler.stream_plan), f"equal-{name}")
            list(handle)
            codes[name] = handle.end.codes
        scheduler.step_fn, scheduler.prefill_fn = graphed, graphed_prefill
        for name, _, _ in variants[:-1]:
            differs = [i for i, (a, b) in enumerate(zip(codes[name], codes["eager"], strict=True)) if (a != b).any()]
            first = differs[0] if differs else None
            key = "graphs_vs_eager" if name == "graphs" else "graphs_eager_prefill_vs_eager"
            report[f"{key}_first_divergent_frame"] = first
            print(f"fast path ({name}; or compiled) vs eager, batch 1, 60 frames: first divergent frame = {first}")
    report["census"] = [step_census(scheduler, n, args.device) for n in (1, 8) if n <= scheduler.slots]
    print("\n## Frame step census\n")
    for row in report["census"]:
        print(row)
    save()
    for size in args.first_frames or []:
        if size != "quick" and not size.isdigit():
            parser.error(f"--first-frames: {size!r} is neither a frame count nor 'quick'")
        if size == "quick" and scheduler.invariance != InvariancePlan():
            parser.error("--first-frames quick: batch invariance fixes the chunk plan (TTS_BATCH_INVARIANT=false)")
    plans = stream_plans(scheduler.stream_plan, args.plans, args.first_frames)
    if scheduler.on_cuda and scheduler.decoder.graph_lengths:  # every plan's windows as graphs, as in serving
        scheduler.decoder.capture(window_lengths([scheduler.quick_plan, *(plan for plan, _ in plans.values())]))
    if args.first_frames and "quick" in args.first_frames and not scheduler.step_intervals:
        scheduler.step_intervals.append(scheduler.time_a_step())  # what the engine does when it is on
    report["load"] = []
    modes = [("graphs", scheduler.step_fn)]
    if not args.no_eager and scheduler.step_fn is not fs.frame_step:
        modes.append(("eager", fs.frame_step))
    graphed_prefill, quick_start = scheduler.prefill_fn, scheduler.quick_start
    intervals = list(scheduler.step_intervals)  # the pace a quick start reads, restored after the streams
    for mode, step in modes:
        scheduler.step_fn = step
        scheduler.prefill_fn = fs.prefill if step is fs.frame_step else graphed_prefill
        run_streams(scheduler, 1, 16, 0, scheduler.stream_plan)  # warm-up
        for count in args.streams:
            if count > scheduler.slots:
                continue
            for name, (plan, quick) in plans.items():  # side by side, one count at a time
                scheduler.step_batch_sizes.clear()
                if args.first_frames:
                    scheduler.quick_start = quick
                result = run_streams(scheduler, count, args.frames, args.stagger_ms / 1000 if count > 1 else 0, plan)
                result["mode"] = mode if len(plans) == 1 else f"{mode}, {name}"
                report["load"].append(result)
                print(result["mode"], result, flush=True)
        scheduler.step_fn, scheduler.prefill_fn = modes[0][1], graphed_prefill
    scheduler.quick_start = quick_start  # as set, for what follows (a lone stream's first audio by prefill)
    scheduler.step_intervals.clear()
    scheduler.step_intervals.extend(intervals)
    print(
        f"\n## Streams, {args.frames} frames ({args.frames / FRAME_RATE:.0f} s) each, "
        f"staggered {args.stagger_ms:.0f} ms\n"
    )
    print(
        "| step | streams | audio s/s | TTFA p50 ms | TTFA p95 ms | slowest stream RTF | median RTF | max step batch |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in report["load"]:
        print(
            f"| {r['mode']} | {r['streams']} | {r['audio_s_per_s']:.1f} | {r['ttfa_p50_ms']:.0f} "
            f"| {r['ttfa_p95_ms']:.0f} "
            f"| {r['rtf_min']:.1f} | {r['rtf_median']:.1f} | {r['batch_max']} |"
        )

    print("\n## Playback: a listener starting at each stream's first chunk\n")
    print("| step | streams | streams that ran dry | stalls | the worst stream's stalls, ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in report["load"]:
        print(
            f"| {r['mode']} | {r['streams']} | {r['streams_ran_dry']} | {r['stalls']} "
            f"| {r['stall_ms_worst_stream']:.0f} |"
        )

    print("\n## Where the time to first audio goes (median ms per phase)\n")
    print("| step | streams | " + " | ".join(label for label, _, _ in FIRST_AUDIO_PHASES) + " | TTFA p50 |")
    print("| --- | ---: | " + " | ".join("---:" for _ in FIRST_AUDIO_PHASES) + " | ---: |")
    for r in report["load"]:
        phases = " | ".join(f"{r['first_audio_ms'][label]:.1f}" for label, _, _ in FIRST_AUDIO_PHASES)
        print(f"| {r['mode']} | {r['streams']} | {phases} | {r['ttfa_p50_ms']:.0f} |")

    print("\n## Where the engine loop's time goes (seconds of the run; the decoder works beside it)\n")
    print("| step | streams | wall | " + " | ".join(LOOP_PHASES) + " | waiting for work | decoder busy |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in LOOP_PHASES) + " | ---: | ---: |")
    for r in report["load"]:
        phases = " | ".join(f"{r['loop_s'][phase]:.2f}" for phase in LOOP_PHASES)
        waiting = r["wall_s"] - sum(r["loop_s"].values())
        print(
            f"| {r['mode']} | {r['streams']} | {r['wall_s']:.2f} | {phases} | {waiting:.2f} "
            f"| {r['decoder_busy_s']:.2f} |"
        )
    if args.device.startswith("cuda"):
        report["peak_gpu_gb_streams"] = torch.cuda.max_memory_allocated() / 1e9
        print(f"\npeak GPU memory allocated by the load and the streams: {report['peak_gpu_gb_streams']:.1f} GB")
    save()
    if not args.no_plain:
        report["plain"] = []
        for batch in (1, 8):
            result = plain_qwen_tts(engine, batch, args.plain_frames, args.device, sample=args.sampling)
            report["plain"].append(result)
            print("plain", result, flush=True)
        print(f"\n## Plain qwen-tts generate_custom_voice, {args.plain_frames} frames, {decoding}\n")
        print("| batch | wall s | audio s | RTF per stream | audio s/s |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for r in report["plain"]:
            print(
                f"| {r['batch']} | {r['wall_s']:.2f} | {r['audio_s']:.1f} | {r['rtf_per_stream']:.2f} "
                f"| {r['audio_s'] / r['wall_s']:.1f} |"
            )
    save()
    prefills = [fs.prefill] + ([scheduler.prefill_fn] if scheduler.prefill_fn is not fs.prefill else [])
    report["prefill_census"] = [prefill_census(scheduler, args.device, prefill) for prefill in prefills]
    print("\n## Prefill census (one request's prompt built and prefilled, eagerly and as the service does)\n")
    for row in report["prefill_census"]:
        print(row)
    if scheduler.prefill_fn is not fs.prefill:
        report["lone_first_audio_by_prefill"] = lone_first_audio_by_prefill(scheduler)

    kv = 256
    report["step_ms"] = []
    with rows_at(scheduler.state, TIMED_KEYS):  # rows as requests there (see kernel_forms), not idle at 0
        for n in (1, 8, 32):
            if n > scheduler.slots:
                continue
            eager_ms = time_steps(fs.frame_step, scheduler, n, kv, args.device, sample=args.sampling)
            row = {"batch": n, "eager_ms": eager_ms}
            if scheduler.step_fn is not fs.frame_step:
                row["graph_ms"] = time_steps(scheduler.step_fn, scheduler, n, kv, args.device, sample=args.sampling)
                row["speedup"] = row["eager_ms"] / row["graph_ms"]
            report["step_ms"].append(row)
    print(f"\n## Frame step time (keys 256, rows at {TIMED_KEYS} live keys, {decoding})\n")
    print("| batch | eager ms | graph ms | graph speed-up | frames/s at graph |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for row in report["step_ms"]:
        g = row.get("graph_ms", float("nan"))
        print(
            f"| {row['batch']} | {row['eager_ms']:.2f} | {g:.2f} | {row.get('speedup', float('nan')):.1f}x "
            f"| {row['batch'] * 1000 / g:.0f} |"
        )
    save()
    if args.kernel_forms:  # not yet run on a GPU: a failure there must not cost the rest of the figures
        try:
            report["kernel_forms"] = kernel_forms(scheduler, args.device)
        except Exception as exc:  # noqa: BLE001
            logger.exception("the kernel forms' comparison failed; going on without it")
            report["kernel_forms"] = f"failed: {exc!r}"[:300]
            for slot in range(scheduler.slots):
                fs.release(scheduler.state, slot)
    hook.remove()
    if args.device.startswith("cuda"):
        report["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        print(f"\npeak GPU memory allocated, the whole run: {report['peak_gpu_gb']:.1f} GB")
    save()


if __name__ == "__main__":
    main()
