"""The step engine against qwen-tts's own generate, greedy: the codec codes must be identical, however
requests join, leave and share steps. Also: no host syncs in the frame step, join and leave touch no
other slot, the step compiles as one graph, failures stay with their requests."""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from scripts.census import census
from tests.company import row_zero_after_steps
from tests.oracle import ORACLE_REQUESTS, reference
from tts_service import frame_step as fs
from tts_service import kv_memory
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.invariance_plan import InvariancePlan
from tts_service.kv_memory import KV_MEMORY
from tts_service.sampling import Draws, SamplerPlan, draws_from, gumbel_noise
from tts_service.settings import Settings

REQUESTS = ORACLE_REQUESTS


@pytest.fixture(scope="module")
def references(engine: TTSEngine) -> dict[str, np.ndarray]:
    return {r.text: reference(engine, r)[0] for r in REQUESTS}


def run_all(engine: TTSEngine, requests: list[SynthesisRequest], prefix: str) -> list:
    handles = [engine.submit(r, f"{prefix}-{i}", stream=False) for i, r in enumerate(requests)]
    for handle in handles:
        list(handle)
    return [handle.end for handle in handles]


def test_single_requests_equal_qwen_tts(engine: TTSEngine, references) -> None:
    for index, request in enumerate(REQUESTS):
        [end] = run_all(engine, [request], f"single-{index}")
        assert end.error is None and end.max_batch == 1
        np.testing.assert_array_equal(end.codes, references[request.text])
    lengths = [len(references[r.text]) for r in REQUESTS]
    assert lengths == [125, 8, 23, 5, 2]  # different lengths; the last stops at qwen-tts's min_new_tokens=2


def test_whole_file_audio_equals_qwen_tts(engine: TTSEngine) -> None:
    """Same codes as qwen-tts, and the same samples but for float rounding: on the CPU the engine decodes a
    whole file in pieces with carried decoder state as it is generated (equal to a whole decode), on one
    CPU thread where qwen-tts uses two (measured: at most 1e-5, a third of one 16-bit step)."""
    request = REQUESTS[0]
    codes, audio = reference(engine, request)
    result = engine.synthesize(request)
    assert result.frames == len(codes) and not result.truncated and len(result.audio) == len(audio)
    assert np.abs(result.audio - audio).max() <= 1 / 32768


def test_requests_joining_at_steps_0_7_and_19_keep_their_codes(engine: TTSEngine, references) -> None:
    """One request starts alone; others are submitted from inside the engine loop right after its 7th
    and 19th step, so they join a running batch at those step boundaries."""
    scheduler = engine.scheduler
    steps = {"count": 0}
    later: dict[int, list] = {7: [REQUESTS[2], REQUESTS[3]], 19: [REQUESTS[1], REQUESTS[4]]}
    handles = []

    def on_step(batch: int) -> None:
        steps["count"] += 1
        for request in later.pop(steps["count"], []):
            handles.append(engine.submit(request, f"join-{steps['count']}-{len(handles)}", stream=False))

    scheduler.on_step = on_step
    try:
        first = engine.submit(REQUESTS[0], "join-0", stream=False)
        list(first)
    finally:
        scheduler.on_step = None
    for handle in handles:
        list(handle)
    ends = [first.end] + [h.end for h in handles]
    for end, request in zip(ends, [REQUESTS[0], REQUESTS[2], REQUESTS[3], REQUESTS[1], REQUESTS[4]], strict=True):
        assert end.error is None
        np.testing.assert_array_equal(end.codes, references[request.text])
    assert first.end.max_batch == 4 and first.end.shared_steps > 0
    assert first.end.shared_steps < first.end.steps  # it ran alone again once the others had left


def test_a_freed_slot_is_reused_and_the_newcomer_is_exact(tiny_dir: Path, cache_dir: Path, references) -> None:
    two_slots = TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", max_batch_size=2)
    )
    order = [REQUESTS[0], REQUESTS[1], REQUESTS[3], REQUESTS[2]]  # long, short, then two waiting for a slot
    ends = run_all(two_slots, order, "reuse")
    assert [end.slots for end in ends[:2]] == [(0,), (1,)]
    assert ends[2].slots == (1,) and ends[3].slots in {(0,), (1,)}  # the short one's slot, freed first
    for end, request in zip(ends, order, strict=True):
        np.testing.assert_array_equal(end.codes, references[request.text])


def test_queue_wait_is_reported_once_per_request_and_counts_the_wait_for_a_slot(
    tiny_dir: Path, cache_dir: Path
) -> None:
    """`on_admit` (the tts_queue_wait_seconds metric) gets each request's wait once, at its first prefill
    (not again per segment); with one slot the second request waits for the whole of the first."""
    one_slot = TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", max_batch_size=1)
    )
    waits: list[float] = []
    steps: list[int] = []
    steps_before: list[int] = []  # steps launched before each admission: counted, not timed (CI is noisy)
    one_slot.scheduler.on_step = steps.append
    one_slot.scheduler.on_admit = lambda wait: (waits.append(wait), steps_before.append(len(steps)))
    long_text = " ".join(["This line is long enough to be spoken as several segments."] * 12)
    first = one_slot.submit(SynthesisRequest(long_text, "ryan", "english"), "wait-0", stream=False)
    second = one_slot.submit(REQUESTS[1], "wait-1", stream=False)
    list(first), list(second)
    assert first.end.error is None and second.end.error is None
    assert first.end.segments > 1
    assert len(waits) == 2  # once per request, however many segments
    # The second was admitted only after every one of the first's steps, and its wait covers them.
    assert steps_before == [0, first.end.steps]
    assert first.end.steps >= len(first.end.codes) > 0
    assert waits[1] > waits[0]  # submitted together, prefilled one whole request apart


def test_frame_budget_truncation_equals_qwen_tts(tiny_dir: Path, cache_dir: Path) -> None:
    small = TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", max_new_tokens=6)
    )
    long_item, short_item = REQUESTS[0], SynthesisRequest("Testing one two three, testing.", "ryan", "english")
    ends = run_all(small, [long_item, short_item], "budget")
    assert (ends[0].frames, ends[0].truncated) == (6, True)
    assert (ends[1].frames, ends[1].truncated) == (4, False)  # its own end of speech, within the budget
    for end, request in zip(ends, [long_item, short_item], strict=True):
        np.testing.assert_array_equal(end.codes, reference(small, request, budget=6)[0])


def test_every_speaker_and_language_together_equal_qwen_tts_alone(engine: TTSEngine) -> None:
    pairs = list(zip(engine.speakers, engine.languages * 2, strict=False))
    pairs += [("Ryan", lang) for lang in engine.languages[len(engine.speakers) :]]
    requests = [
        SynthesisRequest(f"Line {i} for {speaker}.", engine.resolve_speaker(speaker), engine.resolve_language(lang))
        for i, (speaker, lang) in enumerate(pairs)
    ]
    assert {r.speaker for r in requests} == {s.lower() for s in engine.speakers}
    assert {r.language for r in requests} == set(engine.languages)
    ends = run_all(engine, requests, "voices")
    assert max(end.max_batch for end in ends) >= 8  # they really shared steps
    for end, request in zip(ends, requests, strict=True):
        np.testing.assert_array_equal(end.codes, reference(engine, request)[0], err_msg=str(request))


def test_real_layer_counts_equal_qwen_tts(deep_engine: TTSEngine) -> None:
    requests = [REQUESTS[1], REQUESTS[4], SynthesisRequest("Hello from the gallery.", "ryan", "english")]
    ends = run_all(deep_engine, requests, "deep")
    assert max(end.max_batch for end in ends) == 3
    for end, request in zip(ends, requests, strict=True):
        np.testing.assert_array_equal(end.codes, reference(deep_engine, request)[0])


def test_the_gpus_fewer_kernel_forms_give_qwen_tts_codes(engine: TTSEngine, deep_engine: TTSEngine, references) -> None:
    """A GPU in bf16 steps in the fewer-kernel forms (`Stack.fewer_kernels`); their logic is checked here in
    float32, where a wrong head mapping, norm or in-place sum would change the codes: alone, all together
    (admitted in one turn), and at the real layer counts."""
    for tested in (engine, deep_engine):
        scheduler = tested.scheduler
        plain = scheduler.weights
        scheduler.weights = fs.with_fewer_kernels(plain)
        try:
            if tested is engine:
                for index, request in enumerate(REQUESTS[:3]):
                    [end] = run_all(engine, [request], f"fewer-single-{index}")
                    np.testing.assert_array_equal(end.codes, references[request.text])
                with scheduler._wake:  # the loop takes the queue under this lock: one turn admits them all
                    handles = [engine.submit(r, f"fewer-together-{i}", stream=False) for i, r in enumerate(REQUESTS)]
                for handle in handles:
                    list(handle)
                ends = [handle.end for handle in handles]
                assert max(end.max_batch for end in ends) == len(REQUESTS)
                for end, request in zip(ends, REQUESTS, strict=True):
                    np.testing.assert_array_equal(end.codes, references[request.text])
            else:
                requests = [REQUESTS[1], SynthesisRequest("Hello from the gallery.", "ryan", "english")]
                for end, request in zip(run_all(deep_engine, requests, "fewer-deep"), requests, strict=True):
                    np.testing.assert_array_equal(end.codes, reference(deep_engine, request)[0])
        finally:
            scheduler.weights = plain


@pytest.fixture(scope="module")
def interpreted_engine(tiny_dir: Path, cache_dir: Path) -> TTSEngine:
    """For the Triton kernels in Triton's interpreter, which runs a kernel program in milliseconds: without
    batch invariance, so a step's rows are its requests only (not padded to the CPU's four)."""
    return TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", batch_invariant=False)
    )


def test_the_gpus_triton_kernels_give_qwen_tts_codes(interpreted_engine: TTSEngine, references) -> None:
    """The fewer forms with the Triton kernels (`Stack.triton_kernels`), which a GPU compiles; run here in
    Triton's interpreter in float32, the step's own code path: two requests together (one turn), with
    prompts of different lengths, so per-row positions, slots and the code predictor's multi-token first
    step all matter."""
    pytest.importorskip("triton")
    engine = interpreted_engine
    scheduler = engine.scheduler
    plain = scheduler.weights
    scheduler.weights = fs.with_fewer_kernels(plain, True, triton=True)
    try:
        together = [REQUESTS[3], REQUESTS[4]]
        with scheduler._wake:  # the loop takes the queue under this lock: one turn admits them all
            handles = [engine.submit(r, f"triton-together-{i}", stream=False) for i, r in enumerate(together)]
        for handle in handles:
            list(handle)
        assert max(handle.end.max_batch for handle in handles) == len(together)
        for handle, request in zip(handles, together, strict=True):
            np.testing.assert_array_equal(handle.end.codes, references[request.text])
    finally:
        scheduler.weights = plain


def test_tts_fewer_kernels_turns_the_forms_on_and_off(tiny_dir: Path, cache_dir: Path, monkeypatch, references) -> None:
    """`TTS_FEWER_KERNELS` overrides the device's choice (on a CPU: off), e.g. to turn the forms off on a GPU."""
    monkeypatch.setenv("TTS_FEWER_KERNELS", "true")
    settings = Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", max_batch_size=2)
    forced = TTSEngine.load(settings)
    weights = forced.scheduler.weights
    assert weights.talker.fewer_kernels and weights.predictor.fewer_kernels
    assert not weights.talker.triton_kernels  # a GPU's only: on a CPU they would run in Triton's interpreter
    [end] = run_all(forced, [REQUESTS[2]], "forced-fewer")
    np.testing.assert_array_equal(end.codes, references[REQUESTS[2].text])
    monkeypatch.setenv("TTS_FEWER_KERNELS", "false")
    assert Settings().fewer_kernels is False
    monkeypatch.delenv("TTS_FEWER_KERNELS")
    assert Settings().fewer_kernels is None


def test_tts_decode_attention_takes_the_triton_attention_or_sdpa(
    tiny_dir: Path, cache_dir: Path, monkeypatch, caplog
) -> None:
    """`TTS_DECODE_ATTENTION` reaches the scheduler, whose GPU branch (`_use_triton_kernels`, run here in
    Triton's interpreter: on a CPU the scheduler takes no Triton kernels) takes the decode attention over live
    keys with the layer kernels where it passes its own start-up check; `sdpa`, or a failed check, keeps the
    layer kernels and attends with SDPA (and its length buckets). (A short cache, for the interpreter; the
    layer kernels' check, the same each time, runs once.)"""
    pytest.importorskip("triton")
    import logging

    from tts_service import fused_kernels
    from tts_service.scheduler import StepScheduler

    monkeypatch.setenv("TTS_DECODE_ATTENTION", "sdpa")
    assert Settings().decode_attention == "sdpa"
    asked = []
    init = StepScheduler.__init__
    monkeypatch.setattr(StepScheduler, "__init__", lambda self, *a, **k: asked.append(k) or init(self, *a, **k))
    short = {"max_new_tokens": 64, "max_prompt_tokens": 64}
    engine = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, max_batch_size=1, **short))
    assert asked[0]["decode_attention"] == "sdpa"
    monkeypatch.undo()

    scheduler = engine.scheduler
    plain, checked, layers_usable = scheduler.weights, [], []
    usable, attention_usable = fused_kernels.usable, fused_kernels.attention_usable
    decode_attention = fused_kernels.decode_attention

    def usable_once(*args) -> bool:
        if not layers_usable:
            layers_usable.append(usable(*args))
        return layers_usable[0]

    monkeypatch.setattr(fused_kernels, "usable", usable_once)
    monkeypatch.setattr(fused_kernels, "attention_usable", lambda *a: checked.append(a[3]) or attention_usable(*a))
    try:
        scheduler._use_triton_kernels(True)
        w = scheduler.weights
        assert w.talker.triton_kernels and w.triton_sampling and w.talker.triton_attention
        assert checked == [scheduler.max_len]  # at the step's cache length

        scheduler.weights = plain
        scheduler._use_triton_kernels(False)
        w = scheduler.weights
        assert w.talker.triton_kernels and w.triton_sampling and not w.talker.triton_attention
        assert checked == [scheduler.max_len]  # not checked (nor compiled) when not asked for

        scheduler.weights = plain
        monkeypatch.setattr(  # an attention that reads past the live keys fails its check
            fused_kernels,
            "decode_attention",
            lambda q, k, v, positions, scale, looped=False: decode_attention(
                q, k, v, torch.full_like(positions, k.shape[2] - 1), scale, looped
            ),
        )
        with caplog.at_level(logging.WARNING, logger="tts_service.fused_kernels"):
            scheduler._use_triton_kernels(True)
        w = scheduler.weights
        assert w.talker.triton_kernels and w.triton_sampling and not w.talker.triton_attention
        assert "the talker attends with SDPA" in caplog.text
    finally:
        scheduler.weights = plain


def test_grouped_decode_attention_reads_each_query_heads_own_kv_head(quiet_engine) -> None:
    """qwen-tts's repeat_kv: query head h reads KV head h // group. Every KV head holds other values, so a
    wrong mapping shows; rows see different numbers of keys."""
    generator = torch.Generator().manual_seed(3)
    stack = replace(quiet_engine.scheduler.weights.talker, heads=16, kv_heads=4, head_dim=8)
    grouped = replace(stack, fewer_kernels=True)
    q = torch.randn(3, 16, 1, 8, generator=generator)
    k, v = (torch.randn(3, 4, 20, 8, generator=generator) for _ in range(2))
    visible = (torch.arange(20)[None, :] <= torch.tensor([4, 11, 19])[:, None])[:, None, None]
    bias = torch.full(visible.shape, float("-inf")).masked_fill_(visible, 0.0)
    expected = fs._attend_decode(q, k, v, stack, visible)
    np.testing.assert_allclose(fs._attend_decode(q, k, v, grouped, bias), expected, rtol=0, atol=1e-6)
    by_hand = torch.softmax((q @ k.repeat_interleave(4, 1).transpose(-1, -2)) * 8**-0.5 + bias, -1)
    np.testing.assert_allclose(expected, by_hand @ v.repeat_interleave(4, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("plan", [SamplerPlan(), SamplerPlan(candidates=66, top_p=True, greedy_rows=True)])
def test_a_frames_draws_made_at_once_pick_the_tokens_drawn_token_by_token(quiet_engine, plan: SamplerPlan) -> None:
    """`frame_noise` (the GPU's fewer kernels) makes every draw of a frame at once: the same values, so the
    same tokens, over the whole vocabulary and over the top candidates, and a seed replays as before."""
    w = replace(quiet_engine.scheduler.weights, sampler=plan)
    n = 6
    keys = fs.frame_keys(w, torch.arange(n) * 7919 + 3, torch.arange(n) + 2)
    noise = fs.frame_noise(w, keys)
    assert noise.shape == (n, fs.NUM_CODE_GROUPS, w.mixed_ids.shape[0])
    np.testing.assert_array_equal(noise[:, 3], gumbel_noise(draws_from(keys[:, 3], w.mixed_ids)))
    settings = (
        torch.tensor([True, True, False, True, True, True]),
        torch.full((n,), 0.9),
        torch.full((n,), 50),
        torch.tensor([1.0, 0.8, 1.0, 0.95, 1.0, 0.7]),
    )
    generator = torch.Generator().manual_seed(5)
    for column, vocab in ((0, w.codec_head.shape[0]), (7, w.predictor_heads_t[6].shape[1])):
        for _ in range(20):
            logits = torch.randn(n, vocab, generator=generator) * 2
            by_token = fs._choose(w, logits, settings, Draws(keys[:, column]))
            assert torch.equal(fs._choose(w, logits, settings, Draws(noise=noise[:, column])), by_token)


def test_the_gpus_sampling_kernel_draws_the_fewer_forms_tokens(quiet_engine) -> None:
    """Sampled frames (per-row temperature, top-k, greedy and sampling rows; no top-p, the service's default)
    step for step from the same state: with the Triton kernels, whose sampling is one kernel per token
    (`fused_kernels.sample_top_k`, in Triton's interpreter here), the same codes as the fewer forms'."""
    pytest.importorskip("triton")
    w, s = _prefilled(quiet_engine, [0, 1, 2])
    w.sampler = SamplerPlan(candidates=50, top_p=False, greedy_rows=True)
    s.seed[:3] = torch.tensor([11, 12, 13])
    for sampled, temperature, top_k in (
        (s.do_sample, s.temperature, s.top_k),
        (s.sub_do_sample, s.sub_temperature, s.sub_top_k),
    ):
        sampled[:3] = torch.tensor([True, False, True])
        temperature[:3] = torch.tensor([0.9, 1.0, 1.3])
        top_k[:3] = torch.tensor([50, 50, 7])
    saved = _snapshot(s)
    frames = {}
    for triton in (False, True):
        _restore(s, saved)
        forms = fs.with_fewer_kernels(w, True, triton=triton)
        with torch.inference_mode():
            frames[triton] = torch.stack([fs.frame_step(forms, s, 3, 64, True)[0] for _ in range(2)])
    assert torch.equal(frames[True], frames[False])
    assert not torch.equal(frames[False][:, 0], frames[False][:, 1])  # rows sampled differently


def test_the_sampling_kernel_is_timed_apart_from_the_layer_kernels(quiet_engine) -> None:
    """`bench_engine.py --kernel-forms` times the Triton layer kernels with and without the sampling kernel:
    `triton_sampling=False` leaves a sampled frame's tokens to the eager ops, and the default takes the kernel
    for each of the frame's 16 tokens."""
    pytest.importorskip("triton")
    w, s = _prefilled(quiet_engine, [0])
    w = replace(w, sampler=SamplerPlan(candidates=50, top_p=False, greedy_rows=True))
    launches = {}
    for triton_sampling in (False, None):
        forms = fs.with_fewer_kernels(w, True, triton=True, triton_sampling=triton_sampling)
        with torch.inference_mode(), census() as counted:
            fs.frame_step(forms, s, 1, 64, True)
        launches[triton_sampling] = counted.by_op
    assert launches[False]["triton.sample_top_k"] == 0 and launches[False]["triton.silu_mul"] > 0
    assert launches[None]["triton.sample_top_k"] == 16
    # and each talker layer's decode attention: two launches (its splits, then their combination), no SDPA
    for kernel in ("triton.decode_attention_split", "triton.decode_attention_combine"):
        assert launches[None][kernel] == len(s.keys)
    assert launches[None]["aten.scaled_dot_product_attention"] == 15 * len(s.predictor_keys)  # the predictor's


def test_a_timed_step_attends_as_a_request_would_and_leaves_the_free_slots_as_they_were(quiet_engine) -> None:
    """The quick start's first step time (`time_a_step`) runs on free slots, which sit at position 0, where
    an attention over live keys reads one key: its rows stand at TIMED_KEYS keys instead, with the `kv_len`
    the loop would pass there, and get their positions back after. (The kit's staggered rows: one count a
    slot.)"""
    from tts_service.scheduler import TIMED_KEYS, rows_at

    scheduler = quiet_engine.scheduler
    before = scheduler.state.position.clone()
    seen = []
    original = scheduler.step_fn

    def step(w, s, n, kv_len, sample):
        seen.append((s.position[:n].tolist(), kv_len))
        return original(w, s, n, kv_len, sample)

    scheduler.step_fn = step
    try:
        assert scheduler.time_a_step() > 0
    finally:
        scheduler.step_fn = original
    assert len(seen) == 4 and TIMED_KEYS == 200
    assert all(positions == [199] * len(positions) and kv_len == 224 for positions, kv_len in seen)
    assert torch.equal(scheduler.state.position, before)
    with rows_at(scheduler.state, [100, 5000]):  # (past the cache: its last position)
        expected = [99, scheduler.max_len - 1, *before[2:].tolist()]
        assert scheduler.state.position.tolist() == expected
    assert torch.equal(scheduler.state.position, before)


def test_a_prefill_with_the_triton_kernel_writes_each_prompts_cache_into_its_own_slot(quiet_engine) -> None:
    """Prompts of three lengths, right-padded into one prefill, into slots out of order (3, 0, 2): the q/k
    kernel writes each prompt's K/V at its own slot (not its row), and the prefill leaves the fewer forms'
    state, caches within float32's op order, slot 1 untouched."""
    pytest.importorskip("triton")
    scheduler = quiet_engine.scheduler
    w, s = scheduler.weights, scheduler.state
    texts = [REQUESTS[4].text, REQUESTS[1].text + " And a word.", "Short."]  # short: the interpreter is slow
    prompts = [scheduler.prompts.build(text, "ryan", "english") for text in texts]
    assert len({int(p.shape[0]) for p in prompts}) == 3
    slots = [3, 0, 2]
    for cache in (*s.keys, *s.values):
        cache.fill_(7.0)
    saved = _snapshot(s)
    after = {}
    for triton in (False, True):
        _restore(s, saved)
        forms = fs.with_fewer_kernels(w, True, triton=triton)
        with torch.inference_mode(), census() as counted:
            fs.prefill(forms, s, slots, prompts, [scheduler.sampling_params(i) for i in slots])
        assert counted.by_op["triton.qk_norm_rope_kv"] == (len(s.keys) if triton else 0)
        after[triton] = _snapshot(s)
    for name, value in after[False].items():
        for plain, fused in zip(*(v if isinstance(v, list) else [v] for v in (value, after[True][name])), strict=True):
            if plain.is_floating_point():
                torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5, msg=name)
            else:
                assert torch.equal(fused, plain), name
    assert bool((after[True]["keys"][0][1] == 7).all() and (after[True]["values"][-1][1] == 7).all())


def test_a_cpu_kv_that_could_outgrow_the_memory_is_warned_of(
    tiny_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """The service starts whatever its KV's size (it takes memory as it is written), but the log says when
    every slot filled would not fit beside the model, under a container's limit too (cgroup v2)."""
    (tmp_path / "memory.max").write_text("1000000000\n")
    (tmp_path / "memory.current").write_text("400000000\n")
    assert kv_memory.available_memory(tmp_path) == 600_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert kv_memory.available_memory(tmp_path) > 600_000_000  # the machine's, without a limit

    monkeypatch.setattr(KV_MEMORY, "limit", KV_MEMORY.limit)  # restored for the other engines of this session
    settings = Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", max_batch_size=4)
    margin = kv_memory.MARGIN_BYTES
    for available, warned in ((2**40, False), (margin + 2**20, True)):
        monkeypatch.setattr(kv_memory, "available_memory", lambda available=available: available)
        caplog.clear()
        with caplog.at_level("WARNING", logger="tts_service.kv_memory"):
            engine = TTSEngine.load(settings)
        kv = 4 * fs.kv_bytes_per_slot(engine.scheduler.weights, engine.scheduler.max_len)
        messages = [r.getMessage() for r in caplog.records if "KV cache:" in r.getMessage()]
        assert bool(messages) is warned and kv > 2**20
        assert KV_MEMORY.limit == available - max(margin, kv_memory.MARGIN_SHARE * available)
        if warned:
            assert f"4 slots of {engine.scheduler.max_len} positions would take {kv / 1e9:.1f} GB" in messages[0]
            assert "waits while that would not fit" in messages[0]


def test_kv_memory_claims_wait_beside_others_but_never_alone() -> None:
    memory = kv_memory.KVMemory(limit=100)
    assert memory.claim(60) and not memory.claim(50) and memory.claim(40)
    memory.give_back(60)
    memory.give_back(40)
    assert memory.claimed == 0 and memory.claim(150)  # larger than the limit: it runs alone
    assert not memory.claim(1)
    memory.resize(150, 90)  # a request's next segment needs less
    assert memory.claim(10) and memory.claimed == 100


def test_requests_wait_for_cpu_kv_memory_and_keep_their_codes(
    engine: TTSEngine, tiny_dir: Path, cache_dir: Path, references, monkeypatch, caplog
) -> None:
    """On the CPU a request claims its prompt and frame budget of KV memory as it joins (TTS_KV_MEMORY_GB);
    while that would not fit beside the requests running, it waits. Four requests that batch four at a
    time without a limit run two at a time under a limit that holds two and a half, one at a time under a
    limit that holds less than one (rather than none ever), with qwen-tts's codes, and give it all back."""
    request = REQUESTS[0]
    unlimited = run_all(engine, [request] * 4, "kv-free")
    assert [end.max_batch for end in unlimited] == [4] * 4

    monkeypatch.setattr(KV_MEMORY, "limit", KV_MEMORY.limit)  # restored for the other engines of this session
    scheduler = engine.scheduler
    prompt = scheduler.prompts.build(request.text, request.speaker, request.language)
    budget = engine.frame_budget(request.text)
    need = fs.kv_pages_bytes(scheduler.weights, prompt.shape[0] + budget + 1)
    assert need < fs.kv_bytes_per_slot(scheduler.weights, scheduler.max_len)  # a budget, not the whole slot
    for share, most in ((2.5, 2), (0.5, 1)):
        settings = Settings(
            model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", kv_memory_gb=share * need / 1e9
        )
        limited = TTSEngine.load(settings)
        caplog.clear()
        with caplog.at_level("INFO", logger="tts_service.scheduler"):
            ends = run_all(limited, [request] * 4, f"kv-{most}")
        assert [end.error for end in ends] == [None] * 4
        assert max(end.max_batch for end in ends) == most
        for end in ends:
            np.testing.assert_array_equal(end.codes, references[request.text])
        assert KV_MEMORY.claimed == 0
        waits = [r.getMessage() for r in caplog.records if "waits for KV memory" in r.getMessage()]
        assert waits and f"it needs {need / 1e6:.0f} MB" in waits[0]


def test_a_batched_prefill_claims_the_kv_its_padding_writes(tiny_dir: Path, cache_dir: Path, monkeypatch) -> None:
    """Without batch invariance the CPU prefills joining prompts as one batch, which writes every row's keys
    up to the longest prompt: a short request beside a long prompt claims that much, not only its own."""
    monkeypatch.setattr(KV_MEMORY, "limit", KV_MEMORY.limit)  # restored for the other engines of this session
    settings = Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", batch_invariant=False)
    engine = TTSEngine.load(settings)
    scheduler = engine.scheduler
    assert not scheduler.invariance.prefill_alone
    long = SynthesisRequest(text="The gallery's east wing opens at nine, and its west at ten. " * 4, speaker="ryan")
    short = SynthesisRequest(text="Hi.", speaker="ryan")
    seen: list[tuple[int, list[tuple[int, int]]]] = []  # claimed, then each row's prompt and frame budget
    scheduler.on_step = lambda batch: seen.append(
        (KV_MEMORY.claimed, [(row.prompt_len, row.job.budgets[0]) for row in scheduler._rows])
    )
    with scheduler._wake:  # both wait before the loop looks: they join in one admission, one prefill
        handles = [engine.submit(r, f"padded-{i}", stream=False) for i, r in enumerate((long, short))]
    for handle in handles:
        list(handle)
    assert all(handle.end.error is None for handle in handles) and handles[1].end.max_batch == 2
    claimed, [(long_prompt, long_budget), (short_prompt, short_budget)] = seen[0]
    pages = lambda n: fs.kv_pages_bytes(scheduler.weights, n)  # noqa: E731
    assert pages(short_prompt + short_budget + 1) < pages(long_prompt)  # the padding reaches past its own need
    assert claimed == pages(long_prompt + long_budget + 1) + pages(long_prompt)
    assert KV_MEMORY.claimed == 0


def test_fewer_kernels_are_taken_on_a_gpu_in_half_precision_only() -> None:
    assert fs.fewer_kernels_for(torch.device("cuda", 0), torch.bfloat16)
    assert fs.fewer_kernels_for(torch.device("cuda"), torch.float16)
    assert not fs.fewer_kernels_for(torch.device("cuda"), torch.float32)  # GPU equality checks run in float32
    assert not fs.fewer_kernels_for(torch.device("cpu"), torch.bfloat16)


def test_the_cpus_kv_cache_becomes_resident_only_where_it_is_written(engine: TTSEngine) -> None:
    """At 1.7B and 32 slots, writing the KV's 11.5 GB of zeros took 21 s of every CPU start. A 512 MB cache
    for the tiny model now costs no resident memory when allocated, reads as zeros, is aligned as torch's
    own allocations are, and a slot's memory becomes resident when its positions are written."""
    w, slots = engine.scheduler.weights, 4
    max_len = 512 * 2**20 // (slots * fs.kv_bytes_per_slot(w, 1))
    process = psutil.Process()
    before = process.memory_info().rss
    state = fs.allocate_state(w, slots, max_len)
    allocated = process.memory_info().rss - before
    assert allocated < 16 * 2**20, f"{allocated / 2**20:.0f} MB resident for an untouched cache"
    slot = state.keys[0][2]
    mapped = _mapping(slot.data_ptr())[0] if sys.platform == "linux" else 0  # (one VMA may hold other KV too)
    slot.fill_(1.5)
    written = process.memory_info().rss - before
    assert written >= 0.9 * slot.numel() * slot.element_size(), "the written slot is resident"
    assert all(t.data_ptr() % 64 == 0 for t in state.keys + state.values)
    assert not any(bool(t.any()) for t in state.keys[1:] + state.values)
    assert bool((state.keys[0][2] == 1.5).all()) and not bool(state.keys[0][:2].any())
    if sys.platform != "linux":
        return
    resident, flags = _mapping(slot.data_ptr())
    assert "nh" in flags  # a first write takes a 4 kB page, never a 2 MB huge one
    assert resident - mapped == slot.numel() * slot.element_size()  # the written slot, nothing read
    fs.release(state, 2)  # its request left: the slot's pages go back, and read as zeros
    assert _mapping(slot.data_ptr())[0] == mapped
    assert not bool(state.keys[0].any())


def _mapping(address: int) -> tuple[int, list[str]]:
    """Resident bytes and the kernel's flags of the mapping that holds `address` (/proc/self/smaps)."""
    inside, resident = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "Rss:":
            resident = int(line.split()[1]) * 1024
        elif inside and head == "VmFlags:":
            return resident, line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


# ---- the frame function ---------------------------------------------------------------------------


def _prefilled(engine: TTSEngine, slots: list[int]) -> tuple[fs.Weights, fs.SlotState]:
    scheduler = engine.scheduler
    prompts = [scheduler.prompts.build(REQUESTS[i % 3].text, "ryan", "english") for i in slots]
    with torch.inference_mode():
        fs.prefill(scheduler.weights, scheduler.state, slots, prompts, [scheduler.sampling_params(i) for i in slots])
    return scheduler.weights, scheduler.state


def _snapshot(s: fs.SlotState) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v]) for k, v in vars(s).items()}


def _restore(s: fs.SlotState, saved: dict) -> None:
    for key, value in saved.items():
        current = getattr(s, key)
        targets = current if isinstance(current, list) else [current]
        for c, v in zip(targets, value if isinstance(value, list) else [value], strict=True):
            c.copy_(v)


@pytest.fixture()
def quiet_engine(tiny_dir: Path, cache_dir: Path) -> TTSEngine:
    """An engine whose loop never runs, so tests can drive its frame step by hand."""
    return TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", max_batch_size=4)
    )


@pytest.mark.parametrize(
    ("sample", "plan", "fewer_kernels"),
    [
        (False, SamplerPlan(), False),
        (True, SamplerPlan(), False),  # sampling over the whole vocabulary
        (True, SamplerPlan(candidates=50, top_p=True, greedy_rows=True), False),  # over the top candidates
        (True, SamplerPlan(candidates=50, top_p=True, greedy_rows=True), True),  # in the GPU's bf16 forms
        (True, SamplerPlan(candidates=50, top_p=True, greedy_rows=True), "triton"),  # with its Triton kernels
    ],
)
def test_the_frame_step_has_no_host_sync_and_no_tensor_from_python_data(
    quiet_engine, sample: bool, plan: SamplerPlan, fewer_kernels: bool | str
) -> None:
    """(A Triton kernel's launch counts as one kernel; what Triton's interpreter does inside is not counted.)"""
    if fewer_kernels == "triton":
        pytest.importorskip("triton")
    w, s = _prefilled(quiet_engine, [0, 1, 2])
    w.sampler = plan
    w = fs.with_fewer_kernels(w, bool(fewer_kernels), triton=fewer_kernels == "triton")
    with torch.inference_mode():
        for n in (1, 3):
            with census() as counted:
                fs.frame_step(w, s, n, 64, sample)
            assert counted.syncs == 0, counted.sync_ops
            assert counted.python_tensors == 0
            assert counted.kernels > 100  # it did count the step's work


def test_a_prefill_sends_its_python_values_in_two_copies(quiet_engine) -> None:
    """Admitting requests is not a step (it runs eagerly, not in a graph), but on a GPU each tensor made from
    Python data is a blocking copy that waits for the step in flight: a prompt sends only its text's ids, and
    the prefill of 1 or 3 prompts its slots, lengths and sampling settings in two (integers, floats), and
    neither waits for the device."""
    scheduler = quiet_engine.scheduler
    scheduler.prompts.build(REQUESTS[0].text, "ryan", "english")
    with census() as counted:  # a prompt's codec ids (tags, speaker, pad) come from a cache on the device
        scheduler.prompts.build(REQUESTS[1].text, "ryan", "english")
    assert counted.python_tensors == 2  # the tokenizer's output (ids and mask), host-side
    for slots in ([0], [0, 1, 2]):
        prompts = [scheduler.prompts.build(REQUESTS[i % 3].text, "ryan", "english") for i in slots]
        params = [scheduler.sampling_params(i) for i in slots]
        with torch.inference_mode(), census() as counted:
            fs.prefill(scheduler.weights, scheduler.state, slots, prompts, params)
        assert counted.syncs == 0, counted.sync_ops
        assert counted.python_tensors == 2
        assert counted.kernels > 100  # it did count the prefill's work
        for slot, param in zip(slots, params, strict=True):  # the values landed in their slots
            assert int(scheduler.state.seed[slot]) == param.seed
            assert int(scheduler.state.position[slot]) == prompts[slots.index(slot)].shape[0]
            assert float(scheduler.state.temperature[slot]) == pytest.approx(param.temperature)
        for slot in slots:
            fs.release(scheduler.state, slot)


def test_join_and_leave_touch_no_other_slot(quiet_engine) -> None:
    w, s = _prefilled(quiet_engine, [0, 2])
    with torch.inference_mode():
        fs.frame_step(w, s, 3, 64, False)
        before = {
            name: [t[0].clone() for t in value] if isinstance(value, list) else value[0].clone()
            for name, value in vars(s).items()
            if name not in ("rows", "key_index")
        }
        _prefilled(quiet_engine, [1])  # join
        fs.release(s, 2)  # leave
    for name, saved in before.items():
        now = getattr(s, name)
        if isinstance(saved, list):
            assert all(torch.equal(a, b[0]) for a, b in zip(saved, now, strict=True)), name
        else:
            assert torch.equal(saved, now[0]), name
    assert bool(s.active[1]) and not bool(s.active[2])


def test_a_move_touches_only_its_two_slots_and_the_row_goes_on_as_in_place(quiet_engine) -> None:
    """Compaction moves a row from slot 2 into the free slot 0: slot 1 is untouched, and the moved row's
    next frames are the ones it makes when it stays where it was."""
    w, s = _prefilled(quiet_engine, [0, 1, 2])
    with torch.inference_mode():
        fs.frame_step(w, s, 3, 64, False)
        fs.release(s, 0)
        saved = _snapshot(s)
        in_place = [fs.frame_step(w, s, 3, 64, False)[0] for _ in range(4)]
        _restore(s, saved)
        neighbour = {name: [t[1].clone() for t in getattr(s, name)] for name in ("keys", "values")}
        fs.move(s, 2, 0, length=int(s.position[2]))
        assert [bool(a) for a in s.active[:3]] == [True, True, False]
        for name, rows in neighbour.items():
            assert all(torch.equal(a, t[1]) for a, t in zip(rows, getattr(s, name), strict=True)), name
        moved = [fs.frame_step(w, s, 2, 64, False)[0] for _ in range(4)]
    for before, after in zip(in_place, moved, strict=True):
        assert torch.equal(before[2], after[0]) and torch.equal(before[1], after[1])


def test_a_free_slot_in_the_window_attends_one_key(quiet_engine, monkeypatch) -> None:
    """A slot its request left, or moved out of, goes back to position 0. The step still computes it as an
    idle row while it is inside the window (a graph's batch bucket rounds the window up), and the Triton
    decode attention reads a row's keys up to its position: at its old one the idle row would read every
    key its last request wrote, each step. The rows that go on make the frames they made before."""
    pytest.importorskip("triton")
    from tts_service import fused_kernels

    w, s = _prefilled(quiet_engine, [0, 1, 2])
    with torch.inference_mode():
        for _ in range(3):
            fs.frame_step(w, s, 3, 64, False)
        lengths = s.position[:3].tolist()
        assert min(lengths) > 0
        fs.release(s, 0)
        fs.move(s, 2, 0, length=lengths[2])
        assert s.position[:3].tolist() == [lengths[2], lengths[1], 0]
        saved = _snapshot(s)
        fs.release(s, 1)
        assert s.position[:3].tolist() == [lengths[2], 0, 0] and not s.active[1:3].any()
        forms = fs.with_fewer_kernels(w, True, triton=True)
        asked, attention = [], fused_kernels.decode_attention
        monkeypatch.setattr(fused_kernels, "decode_attention", lambda *a: asked.append(a[3].tolist()) or attention(*a))
        frames = fs.frame_step(forms, s, 3, 64, False)[0]
        assert len(asked) == len(s.keys) and all(p == [lengths[2], 0, 0] for p in asked)
        monkeypatch.undo()
        _restore(s, saved)  # (slot 1 still running)
        before = fs.frame_step(w, s, 3, 64, False)[0]
    torch.testing.assert_close(frames[0], before[0], rtol=0, atol=0)


@pytest.fixture(scope="module")
def company_engines(tiny_dir: Path, cache_dir: Path) -> dict[bool, TTSEngine]:
    """Sampling engines with 8 slots whose loops never run, batch invariant (the default) and not."""
    return {
        invariant: TTSEngine.load(
            Settings(
                model=str(tiny_dir), cache_dir=cache_dir, device="cpu", max_batch_size=8, batch_invariant=invariant
            )
        )
        for invariant in (True, False)
    }


def test_a_row_keeps_the_same_bits_alone_and_in_any_company(company_engines, deep_engine) -> None:
    """A seed replays byte for byte only if nothing a row computes depends on how many rows share the
    step: with products padded to the rows the start-up check chose (2 or 4 on the CPUs measured) and each
    prompt attended over its own length, every float the row keeps is bit-identical alone and beside 1, 2,
    3 or 7 others (longer prompts lengthen the keys a step attends over). Without the padding the same
    comparison differs in the last bits, so this test can tell."""
    for engine in (company_engines[True], deep_engine):
        assert engine.scheduler.weights.talker.min_rows in fs.INVARIANT_ROW_PADDINGS
        alone = row_zero_after_steps(engine, 1)
        for n in (2, 3, 4, 8):
            company = row_zero_after_steps(engine, n)
            assert all(torch.equal(a, b) for a, b in zip(alone, company, strict=True)), n
    plain = company_engines[False]
    assert plain.scheduler.weights.talker.min_rows == 1
    alone = row_zero_after_steps(plain, 1)
    company = row_zero_after_steps(plain, 8)
    assert torch.equal(alone[0], company[0])  # the same codes here, but not the same floats:
    assert not torch.equal(alone[1], company[1])


def test_the_window_shrinks_when_requests_below_a_long_one_leave(engine: TTSEngine, references) -> None:
    """Two short requests in slots 0 and 1, a long one in slot 2: as each short one ends, the long one moves
    down, so the step computes one row, not three, for the rest of it; its codes stay qwen-tts's."""
    scheduler = engine.scheduler
    moves = scheduler.moves
    order = [REQUESTS[1], REQUESTS[3], REQUESTS[0]]  # 8, 5 and 125 frames
    ends = run_all(engine, order, "compact")
    assert [end.slots for end in ends] == [(0,), (1,), (2,)]  # where each was prefilled
    for end, request in zip(ends, order, strict=True):
        np.testing.assert_array_equal(end.codes, references[request.text])
    assert scheduler.moves - moves == 2
    windows = list(scheduler.step_windows)[-ends[2].steps :]
    assert windows[0] == 3 and windows[-1] == 1 and windows.count(1) >= 125 - 10


def test_a_lone_request_is_stepped_beside_free_slots_rather_than_padded(engine: TTSEngine, references) -> None:
    """On the CPU, batch invariance wants every product over at least 2 or 4 rows (whichever the start-up
    check chose). A step of fewer rows computes free slots beside them instead of padding each product
    (fewer operations, the same bits): a lone request is stepped in a window of that many rows and its codes
    stay qwen-tts's. Fewer slots than that: no widening."""
    scheduler = engine.scheduler
    rows = scheduler.invariance.min_rows
    assert rows in fs.INVARIANT_ROW_PADDINGS and scheduler.invariance.min_window == rows
    assert InvariancePlan.choose(True, on_cuda=False, slots=3, stateful_decoding=True).min_window == 1
    assert InvariancePlan.choose(True, on_cuda=True, slots=8, stateful_decoding=True).min_window == 1
    windows: list[int] = []
    step = scheduler.step_fn

    def recording(w: fs.Weights, s: fs.SlotState, n: int, kv_len: int, sample: bool = True):
        windows.append(n)
        return step(w, s, n, kv_len, sample)

    scheduler.step_fn = recording
    try:
        [end] = run_all(engine, [REQUESTS[2]], "widened")
    finally:
        scheduler.step_fn = step
    assert end.max_batch == 1 and set(windows) == {rows} and len(windows) >= end.steps
    np.testing.assert_array_equal(end.codes, references[REQUESTS[2].text])


@pytest.mark.parametrize("fewer_kernels", [False, True])
def test_the_frame_step_compiles_as_one_graph_and_computes_the_same(quiet_engine, fewer_kernels: bool) -> None:
    w, s = _prefilled(quiet_engine, [0, 1])
    w = fs.with_fewer_kernels(w, fewer_kernels)
    with torch.inference_mode():
        saved = _snapshot(s)
        eager = [fs.frame_step(w, s, 2, 64, True) for _ in range(3)]
        _restore(s, saved)
        compiled = torch.compile(fs.frame_step, fullgraph=True, backend="aot_eager", dynamic=False)
        graphed = [compiled(w, s, 2, 64, True) for _ in range(3)]
    for (frames_a, done_a), (frames_b, done_b) in zip(eager, graphed, strict=True):
        assert torch.equal(frames_a, frames_b) and torch.equal(done_a, done_b)


# ---- failures -------------------------------------------------------------------------------------


def test_a_failing_step_ends_only_its_requests_and_the_engine_goes_on(tiny_dir: Path, cache_dir: Path) -> None:
    fragile = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu"))
    scheduler = fragile.scheduler
    real_step = scheduler.step_fn
    calls = {"n": 0}

    def failing_step(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected step fault")
        return real_step(*args)

    scheduler.step_fn = failing_step
    ends = run_all(fragile, [REQUESTS[0], REQUESTS[2]], "fault")
    assert all(end.error and "injected step fault" in end.error for end in ends)
    [after] = run_all(fragile, [REQUESTS[1]], "after-fault")
    assert after.error is None and after.frames == 8


def test_a_request_whose_prompt_cannot_be_built_fails_alone(engine: TTSEngine, references, monkeypatch) -> None:
    real_build = engine.scheduler.prompts.build

    def build(text, *args, **kwargs):
        if "POISON" in text:
            raise RuntimeError("injected prompt fault")
        return real_build(text, *args, **kwargs)

    monkeypatch.setattr(engine.scheduler.prompts, "build", build)
    poisoned, healthy = run_all(engine, [SynthesisRequest("POISON here.", "ryan", "english"), REQUESTS[1]], "prompt")
    assert poisoned.error and "injected prompt fault" in poisoned.error and poisoned.frames == 0
    assert healthy.error is None
    np.testing.assert_array_equal(healthy.codes, references[REQUESTS[1].text])


def test_cancelling_frees_the_slot_and_the_neighbour_completes(engine: TTSEngine, references) -> None:
    long_one = engine.submit(REQUESTS[0], "to-cancel", stream=True)
    neighbour = engine.submit(REQUESTS[3], "neighbour", stream=True)
    iterator = iter(long_one)
    assert len(next(iterator)) == 4 * 1920
    long_one.cancel()
    rest = list(iterator)
    assert long_one.end.cancelled and long_one.end.frames < 125 and len(rest) <= 2
    list(neighbour)
    np.testing.assert_array_equal(neighbour.end.codes, references[REQUESTS[3].text])
    assert engine.cancel("to-cancel") is False  # gone from the books
    done = threading.Event()
    for _ in range(100):
        if engine.scheduler.active == 0:
            done.set()
            break
        threading.Event().wait(0.02)
    assert done.is_set()


def test_a_prompt_too_long_for_its_slot_fails_alone(tiny_dir: Path, cache_dir: Path, references) -> None:
    """Slots of 64 + 64 positions: a 300-character instruction cannot fit; its neighbour still runs."""
    cramped = TTSEngine.load(
        Settings(
            model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", max_prompt_tokens=64, max_new_tokens=64
        )
    )
    wordy = SynthesisRequest("Hi.", "ryan", "english", "Speak " + "very " * 60 + "slowly.")
    too_long, fine = run_all(cramped, [wordy, REQUESTS[4]], "cramped")
    assert too_long.error and "TTS_MAX_PROMPT_TOKENS" in too_long.error
    assert fine.error is None
    np.testing.assert_array_equal(fine.codes, references[REQUESTS[4].text])
