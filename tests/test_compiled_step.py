"""`TTS_COMPILE_STEP`: the frame step through Inductor, compiled once with dynamic shapes at start-up.
Its codes must stay qwen-tts's, and serving must never wait for the compiler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from tests.company import row_zero_after_steps
from tests.oracle import ORACLE_REQUESTS, reference
from tts_service import frame_step as fs
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.settings import Settings
from tts_service.step_compiler import CompiledFrameStep, warm_up_shapes


@pytest.fixture(scope="module")
def compiled_engine(tiny_dir: Path, cache_dir: Path) -> TTSEngine:
    torch._dynamo.reset()  # no dynamic-shape decisions left by other compiles of the step in this process
    before = counters["stats"]["unique_graphs"]
    engine = TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", compile_step=True)
    )
    assert isinstance(engine.scheduler.step_fn, CompiledFrameStep)
    # The scheduler steps n from its window (the products' row padding chosen at start-up) on: that n at
    # its first length, at any length, then any n at any length: three graphs in all (not the n = 1 to 3
    # graphs of a GPU's or an unpadded step, which this one never runs)
    plan = engine.scheduler.invariance
    assert plan.min_window == plan.min_rows > 1
    assert counters["stats"]["unique_graphs"] - before == 3
    return engine


def test_warm_up_shapes_make_both_sizes_dynamic_within_the_slots() -> None:
    assert warm_up_shapes(32, 2560) == [(1, 32), (1, 64), (2, 64), (3, 32), (1, 96), (5, 64)]
    assert warm_up_shapes(2, 2560) == [(1, 32), (1, 64), (2, 64), (2, 32), (1, 96)]
    assert warm_up_shapes(4, 2560) == [(1, 32), (1, 64), (2, 64), (3, 32), (1, 96), (4, 64)]
    assert warm_up_shapes(1, 2560) == [(1, 32), (1, 64)]
    # From the CPU's window (the products' row padding): no n below it, no padding guard to cross.
    assert warm_up_shapes(32, 2560, min_window=2, min_rows=2) == [(2, 32), (2, 64), (3, 32)]
    assert warm_up_shapes(32, 2560, min_window=4, min_rows=4) == [(4, 32), (4, 64), (5, 32)]
    assert warm_up_shapes(2, 2560, min_window=2, min_rows=2) == [(2, 32), (2, 64)]
    # Padded past 4 rows (a GPU's invariance: every product over all slots): n past it too.
    assert warm_up_shapes(32, 2560, min_rows=32)[-1] == (32, 64)
    assert all(kv <= 80 for _, kv in warm_up_shapes(4, 80))


def test_compiled_step_keeps_qwen_tts_codes_at_every_batch_without_compiling_again(compiled_engine) -> None:
    engine = compiled_engine
    eager_before = engine.scheduler.step_fn.eager_calls
    ends = _serve_alone_and_together(engine)
    assert engine.scheduler.step_fn.eager_calls == eager_before  # every step ran a warmed-up graph
    requests = ORACLE_REQUESTS + _every_voice(engine)
    for end, request in zip(ends, requests, strict=True):
        assert end.error is None
        np.testing.assert_array_equal(end.codes, reference(engine, request)[0], err_msg=str(request))


def test_the_compiled_step_keeps_a_rows_bits_alone_and_in_company(compiled_engine) -> None:
    """Batch invariance through Inductor's fused kernels too: the compiled step (warmed up greedy) gives
    row 0 the same bits alone and beside 1, 2, 3 and 7 others, each from a warmed-up graph (stepped in the
    scheduler's window)."""
    step = compiled_engine.scheduler.step_fn
    eager_before = step.eager_calls
    window = compiled_engine.scheduler.invariance.min_window
    alone = row_zero_after_steps(compiled_engine, 1, step=step, sample=False, window=window)
    for n in (2, 3, 4, 8):
        company = row_zero_after_steps(compiled_engine, n, step=step, sample=False, window=window)
        assert all(torch.equal(a, b) for a, b in zip(alone, company, strict=True)), n
    assert step.eager_calls == eager_before


def _every_voice(engine: TTSEngine) -> list[SynthesisRequest]:
    pairs = list(zip(engine.speakers, engine.languages * 2, strict=False))
    return [
        SynthesisRequest(f"Line {i} for {speaker}.", engine.resolve_speaker(speaker), engine.resolve_language(lang))
        for i, (speaker, lang) in enumerate(pairs)
    ]


def _serve_alone_and_together(engine: TTSEngine) -> list:
    ends = []
    for index, request in enumerate(ORACLE_REQUESTS):  # n = 1, lengths 2 to 125 frames
        handle = engine.submit(request, f"compiled-alone-{index}", stream=False)
        list(handle)
        ends.append(handle.end)
    handles = [engine.submit(r, f"compiled-together-{i}", stream=False) for i, r in enumerate(_every_voice(engine))]
    for handle in handles:
        list(handle)
    assert max(h.end.max_batch for h in handles) >= 8  # many window sizes and key lengths were stepped
    return ends + [handle.end for handle in handles]


def test_a_shape_the_warm_up_did_not_cover_runs_eagerly_instead_of_compiling(compiled_engine) -> None:
    """Warmed up for greedy decoding; a sampling step would need a new graph. It must run eagerly (and
    give the eager step's result) rather than stall the engine loop for a compile."""
    engine = compiled_engine
    w, s = engine.scheduler.weights, engine.scheduler.state
    graphs, eager_before = counters["stats"]["unique_graphs"], engine.scheduler.step_fn.eager_calls
    with torch.inference_mode():
        prompts = [engine.scheduler.prompts.build(r.text, r.speaker, r.language) for r in ORACLE_REQUESTS[:2]]
        fs.prefill(w, s, [0, 1], prompts, [engine.scheduler.sampling_params(seed) for seed in (5, 6)])
        saved = {k: v.clone() for k, v in vars(s).items() if isinstance(v, torch.Tensor)}
        eager = fs.frame_step(w, s, 2, 64, True)
        for key, value in saved.items():
            getattr(s, key).copy_(value)
        compiled = engine.scheduler.step_fn(w, s, 2, 64, True)
        for slot in (0, 1):
            fs.release(s, slot)
    assert counters["stats"]["unique_graphs"] == graphs
    assert engine.scheduler.step_fn.eager_calls == eager_before + 1
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_with_sampling_the_same_seed_gives_the_same_bytes_alone_and_in_a_busy_batch(
    tiny_dir: Path, cache_dir: Path
) -> None:
    """The seed promise holds for the compiled step too: the n = 1 and n >= 2 graphs draw the same codes
    for a row, and they are the eager step's. Warmed up for sampling (qwen-tts's own settings, top-k 50,
    temperature 0.9), with no eager fallback."""
    settings = Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=False, device="cpu")
    engine = TTSEngine.load(settings.model_copy(update={"compile_step": True}))
    seeded = SynthesisRequest(
        "The harbour master raises his lantern and calls across the water.", "uncle_fu", "english", seed=1234
    )
    alone = engine.synthesize(seeded)
    assert alone.batch_size == 1 and alone.frames > 4
    others = [
        engine.submit(SynthesisRequest(r.text, r.speaker, r.language, seed=i), f"sampled-{i}")
        for i, r in enumerate(ORACLE_REQUESTS)
    ]
    busy = engine.synthesize(seeded)
    for handle in others:
        list(handle)
    assert busy.batch_size >= 2 and engine.scheduler.step_fn.eager_calls == 0
    assert np.array_equal(busy.audio, alone.audio)
    eager = TTSEngine.load(settings).synthesize(seeded)
    assert eager.frames == alone.frames and np.array_equal(eager.audio, alone.audio)
