"""Seeded sampling (the same seed gives the same audio whoever shares the batch) and long texts spoken
whole as segments."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.oracle import reference
from tts_service import frame_step as fs
from tts_service.dev.tiny_checkpoint import CODEC_EOS
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.invariance_plan import InvariancePlan
from tts_service.sampling import (
    MAX_CANDIDATES,
    TIE_MARGIN,
    Draws,
    SamplerPlan,
    SamplingParams,
    choose_among_top,
    draws_from,
    filter_and_choose,
    mixed_ids,
    row_keys,
    uniform,
    unit_interval,
)
from tts_service.scheduler import StepScheduler
from tts_service.segmenting import split_text
from tts_service.settings import Settings

LINE = SynthesisRequest("The harbour master raises his lantern and calls across the water.", "uncle_fu", "english")
OTHERS = [
    SynthesisRequest("A robot hums a tune while it sweeps the deck.", "ryan", "english"),
    SynthesisRequest("これは日本語のテキストです。", "ono_anna", "japanese"),
    SynthesisRequest("Your companion laughs and points at the stars.", "serena", "auto", "Speak warmly"),
]


@pytest.fixture(scope="module")
def sampling_engine(tiny_dir: Path, cache_dir: Path) -> TTSEngine:
    """qwen-tts's own sampling settings (generation_config.json: top-k 50, temperature 0.9)."""
    engine = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=False, device="cpu"))
    assert engine.sampling_defaults()["do_sample"] and engine.sampling_defaults()["subtalker_dosample"]
    return engine


def pcm16(result) -> bytes:
    return (np.clip(result.audio, -1, 1) * 32767).round().astype("<i2").tobytes()


def test_the_same_seed_gives_the_same_bytes_alone_and_in_a_busy_batch(sampling_engine: TTSEngine) -> None:
    seeded = SynthesisRequest(LINE.text, LINE.speaker, LINE.language, seed=1234)
    alone = sampling_engine.synthesize(seeded)
    assert alone.batch_size == 1 and alone.frames > 4
    handles = [
        sampling_engine.submit(SynthesisRequest(o.text, o.speaker, o.language, o.instruct, seed=i), f"n{i}")
        for i, o in enumerate(OTHERS)
    ]
    busy = sampling_engine.synthesize(seeded)
    for handle in handles:
        list(handle)
    assert busy.batch_size >= 2  # it really shared its steps
    assert pcm16(busy) == pcm16(alone)


def _with_plan(
    tiny_dir: Path, cache_dir: Path, plan: InvariancePlan, decode_batching: bool, greedy: bool = False
) -> TTSEngine:
    """An engine with 8 slots whose scheduler follows `plan` and decodes streams as a GPU does by default:
    windows without carried state, the due ones lengthened to one call when `decode_batching`."""
    engine = TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=greedy, device="cpu", decoder_worker="thread")
    )
    engine.scheduler = StepScheduler(  # its loop and decoder thread start with the first request
        engine.model,
        slots=8,
        max_len=engine.scheduler.max_len,
        sampling=engine.sampling_defaults(),
        invariance=plan,
        decode_batching=decode_batching,
        stateful_streams=False,
        decoder_process=False,
    )
    return engine


def _finished(engine: TTSEngine, requests: list[SynthesisRequest]) -> list:
    handles = [engine.submit(r, f"finished-{i}", stream=False) for i, r in enumerate(requests)]
    for handle in handles:
        list(handle)
    return handles


def _streamed_alone_and_in_company(engine: TTSEngine) -> tuple[bytes, bytes, int]:
    """One seeded line streamed alone, then while seven others stream beside it."""

    def heard(handle) -> bytes:
        return (np.clip(np.concatenate(list(handle)), -1, 1) * 32767).round().astype("<i2").tobytes()

    seeded = SynthesisRequest(LINE.text, LINE.speaker, LINE.language, seed=1234)
    alone = heard(engine.submit(seeded, "gpu-plan-alone"))
    others = [
        engine.submit(SynthesisRequest(o.text + " Again." * i, o.speaker, o.language, o.instruct, seed=i), f"o{i}")
        for i, o in enumerate([*OTHERS, *OTHERS, OTHERS[0]])
    ]
    handle = engine.submit(seeded, "gpu-plan-company")
    company = heard(handle)
    for other in others:
        list(other)
    return alone, company, handle.end.max_batch


def test_the_gpu_invariance_plan_keeps_a_seeds_bytes_on_the_cpu(tiny_dir: Path, cache_dir: Path) -> None:
    """What batch invariance does on a GPU (products over every slot's row, each prompt prefilled alone,
    each window decoded alone at its own length), run on the CPU: a seeded stream's bytes are the same
    alone and beside seven others, and greedy codes still equal qwen-tts's. What it avoids, a window
    lengthened to share its neighbours' call (the GPU's default decoding), gives other samples. Whether
    the GPU's own kernels keep the bits is for scripts/check_seed_replay.py on a GPU."""
    gpu_plan = InvariancePlan.choose(True, on_cuda=True, slots=8, stateful_decoding=False)
    assert gpu_plan == InvariancePlan(min_rows=8, prefill_alone=True, decode_alone=True)
    engine = _with_plan(tiny_dir, cache_dir, gpu_plan, decode_batching=False)
    assert engine.scheduler.weights.talker.min_rows == 8 and not engine.scheduler.decoder.batched
    alone, company, batch = _streamed_alone_and_in_company(engine)
    assert batch >= 4 and company == alone
    engine = _with_plan(tiny_dir, cache_dir, gpu_plan, decode_batching=False, greedy=True)
    handles = _finished(engine, [LINE, *OTHERS])
    for handle, request in zip(handles, [LINE, *OTHERS], strict=True):
        assert handle.end.max_batch >= 2  # prefilled one by one, stepped together
        np.testing.assert_array_equal(handle.end.codes, reference(engine, request)[0])

    # What the plan avoids: a window lengthened to share a neighbour's call (more left context) gives its
    # new frames other samples.
    codes, spf = max((handle.end.codes for handle in handles), key=len), engine.samples_per_frame
    decoder = engine.scheduler.decoder
    own, lengthened = decoder.decode([codes[-29:]])[0], decoder.decode([codes[-45:]])[0]
    assert len(codes) >= 45 and not np.array_equal(own[-4 * spf :], lengthened[-4 * spf :])


def test_stream_windows_without_state_keep_a_seeds_bytes_on_the_cpu(tiny_dir: Path, cache_dir: Path) -> None:
    """`TTS_STREAM_DECODER=window` on the CPU: batched convolutions would change a window's bits, so with
    batch invariance on (the default) each window is decoded alone, and a seeded stream keeps its bytes
    beside seven others; the same window decoded beside another comes out different."""
    engine = TTSEngine.load(
        Settings(
            model=str(tiny_dir),
            cache_dir=cache_dir,
            greedy=False,
            device="cpu",
            max_batch_size=8,
            stream_decoder="window",
            decoder_worker="thread",
        )
    )
    plan = engine.scheduler.invariance  # the weights' layout is whichever keeps the bits on this CPU
    rows = plan.min_rows
    assert rows in fs.INVARIANT_ROW_PADDINGS
    assert replace(plan, contiguous_weights=False) == InvariancePlan(rows, True, True, rows)
    alone, company, batch = _streamed_alone_and_in_company(engine)
    assert batch >= 4 and company == alone
    # What it avoids: the same window decoded beside another of its length comes out with other bits.
    seeded = [SynthesisRequest(r.text, r.speaker, r.language, r.instruct, seed=5) for r in (LINE, OTHERS[0])]
    windows = [handle.end.codes[:16] for handle in _finished(engine, seeded)]
    decoder = engine.scheduler.decoder
    assert not np.array_equal(decoder.decode(windows[:1])[0], decoder.decode(windows)[0])


def test_a_different_seed_gives_different_audio(sampling_engine: TTSEngine) -> None:
    first = sampling_engine.synthesize(SynthesisRequest(LINE.text, LINE.speaker, LINE.language, seed=1))
    second = sampling_engine.synthesize(SynthesisRequest(LINE.text, LINE.speaker, LINE.language, seed=2))
    assert pcm16(first) != pcm16(second)


def test_sampling_draws_follow_the_filtered_distribution() -> None:
    """Gumbel-max over top-k filtered logits: never outside the top k, and frequencies follow softmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(4000, 1)
    rows = torch.arange(4000)
    draws = uniform(rows, torch.zeros(4000, dtype=torch.long), 3, 5)
    assert 0 < float(draws.min()) and float(draws.max()) < 1
    chosen = filter_and_choose(
        logits,
        torch.ones(4000, dtype=torch.bool),
        torch.ones(4000),
        torch.full((4000,), 3),
        torch.ones(4000),
        draws,
    )
    counts = torch.bincount(chosen, minlength=5).float() / 4000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), dim=0)
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], expected, atol=0.03), counts
    greedy = filter_and_choose(
        logits[:2],
        torch.zeros(2, dtype=torch.bool),
        torch.ones(2),
        torch.zeros(2, dtype=torch.long),
        torch.ones(2),
        draws[:2],
    )
    assert greedy.tolist() == [0, 0]


def test_the_extreme_draws_never_pick_a_suppressed_token() -> None:
    """Found by CI with random seeds: 4 of 640 sampled requests emitted a suppressed control code (a
    decoder IndexError, 500) because the largest 32-bit hash became u = 1.0 in float32, whose Gumbel
    noise is +inf, and -inf + inf = NaN, which argmax picks. Draws stay strictly inside (0, 1)."""
    extremes = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 513, 2**32 - 512, 2**32 - 1], dtype=torch.long)
    u = unit_interval(extremes)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    logits = torch.tensor([[1.0, 0.5, float("-inf"), 0.0]]).repeat(len(extremes), 1)
    draws = unit_interval(extremes.roll(1)[:, None].repeat(1, 4).flip(0))
    draws[:, 2] = u  # the suppressed id gets every extreme draw, its neighbours others
    for k in (0, 2):  # top-k off and on
        chosen = filter_and_choose(
            logits,
            torch.ones(len(extremes), dtype=torch.bool),
            torch.full((len(extremes),), 0.9),
            torch.full((len(extremes),), k),
            torch.ones(len(extremes)),
            draws,
        )
        assert (chosen != 2).all(), chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.4])
@pytest.mark.parametrize("vocab", [2048, 3072])
def test_sampling_among_the_top_candidates_draws_what_the_whole_vocabulary_draws(
    vocab: int, top_p: float, dtype: torch.dtype
) -> None:
    """The fast path (top-k at most the candidates) picks the very token of the whole-vocabulary path,
    row for row, from the same draws: the same seed keeps giving the same audio. bf16 logits (a GPU's)
    tie often, and top-k keeps every logit equal to the k-th largest."""
    generator = torch.Generator().manual_seed(vocab + int(top_p * 10))
    rows = 256
    logits = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype).float()
    if vocab == 3072:
        logits[:, 2048:] = float("-inf")  # the talker's suppressed control codes
    seed = torch.randint(0, 2**62, (rows,), generator=generator)
    counter = torch.randint(0, 2000, (rows,), generator=generator)
    key = row_keys(seed, counter, torch.tensor(5))
    do_sample = torch.rand(rows, generator=generator) < 0.8
    temperature = torch.rand(rows, generator=generator) + 0.5
    top_k = torch.randint(1, 51, (rows,), generator=generator)
    if dtype == torch.bfloat16:  # ties at the k-th largest, which top-k keeps, really happen here
        ordered = logits.sort(dim=-1, descending=True).values
        assert (ordered.gather(1, (top_k - 1)[:, None]) == ordered.gather(1, top_k[:, None])).sum() > 20
    top_ps = torch.full((rows,), top_p)
    mixed = mixed_ids(vocab)
    whole = filter_and_choose(logits, do_sample, temperature, top_k, top_ps, draws_from(key, mixed))
    assert torch.equal(draws_from(key, mixed), uniform(seed, counter, 5, vocab))  # a key per row, hashed once
    plan = SamplerPlan(candidates=50 + TIE_MARGIN, top_p=top_p < 1, greedy_rows=True)
    assert torch.equal(choose_among_top(logits, do_sample, temperature, top_k, top_ps, Draws(key), mixed, plan), whole)
    # Every row sampling with top-k 50 (qwen-tts's): the plan leaves the greedy argmax out.
    everyone, fifty = torch.ones(rows, dtype=torch.bool), torch.full((rows,), 50)
    whole = filter_and_choose(logits, everyone, temperature, fifty, top_ps, draws_from(key, mixed))
    plan = SamplerPlan(candidates=50 + TIE_MARGIN, top_p=top_p < 1, greedy_rows=False)
    assert torch.equal(choose_among_top(logits, everyone, temperature, fifty, top_ps, Draws(key), mixed, plan), whole)


def test_the_sampler_plan_follows_the_services_settings() -> None:
    qwen = SamplingParams(True, 0.9, 50, 1.0, 1.05, True, 0.9, 50, 1.0, seed=0)
    assert SamplerPlan.of(qwen) == SamplerPlan(candidates=50 + TIE_MARGIN, top_p=False, greedy_rows=False)
    mixed = SamplingParams(True, 0.9, 20, 0.8, 1.05, False, 0.9, 0, 1.0, seed=0)  # predictor greedy
    assert SamplerPlan.of(mixed) == SamplerPlan(candidates=20 + TIE_MARGIN, top_p=True, greedy_rows=True)
    for top_k in (0, MAX_CANDIDATES + 1):  # top-k off, or too large to pay: the whole vocabulary
        params = SamplingParams(True, 0.9, top_k, 1.0, 1.05, True, 0.9, 50, 1.0, seed=0)
        assert SamplerPlan.of(params).candidates == 0


def test_the_engine_samples_the_same_codes_either_way(sampling_engine: TTSEngine) -> None:
    """The wiring: the service's plan (50 candidates) against the whole-vocabulary path, same seeds."""
    weights = sampling_engine.scheduler.weights
    assert weights.sampler.candidates == 50 + TIE_MARGIN
    codes = {}
    for name, plan in (("fast", weights.sampler), ("whole", SamplerPlan())):
        weights.sampler = plan
        try:
            handles = [
                sampling_engine.submit(
                    SynthesisRequest(r.text, r.speaker, r.language, r.instruct, seed=7 + i), name + str(i)
                )
                for i, r in enumerate([LINE, *OTHERS])
            ]
            for handle in handles:
                list(handle)
            codes[name] = [handle.end.codes for handle in handles]
        finally:
            weights.sampler = SamplerPlan.of(sampling_engine.scheduler.sampling_params(0))
    assert sum(len(c) for c in codes["fast"]) > 40
    # And the keys of a frame are those each draw had when it hashed its own: the talker's next token
    # at counter `generated`, codebook 0; the predictor's codebooks c at the frame's own index.
    seed, generated = torch.tensor([3, 2**40 + 5]), torch.tensor([1, 77])
    keys = fs.frame_keys(weights, seed, generated)
    assert torch.equal(keys[:, 0], row_keys(seed, generated, torch.tensor(0)))
    for c in range(1, 16):
        assert torch.equal(keys[:, c], row_keys(seed, generated - 1, torch.tensor(c)))
    assert all(np.array_equal(a, b) for a, b in zip(codes["fast"], codes["whole"], strict=True))


# ---- long texts -------------------------------------------------------------------------------------


def test_split_text_cuts_at_sentences_then_clauses_and_loses_nothing() -> None:
    text = "First sentence here. Second one, with a clause; and another! 第三句。第四句！" + " word" * 12
    segments = split_text(text, lambda s: len(s) <= 24, max_chars=24)
    assert all(len(s) <= 24 for s in segments)
    # Neighbouring pieces are packed back together while they fit.
    assert segments[:4] == ["First sentence here.", "Second one,", "with a clause;", "and another! 第三句。第四句！"]
    assert re.sub(r"\s", "", "".join(segments)) == re.sub(r"\s", "", text)
    assert split_text("Short.", lambda s: True, max_chars=10) == ["Short."]
    assert split_text("x" * 25, lambda s: len(s) <= 10, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]


LONG_TEXT = " ".join(
    f"Sentence number {i} tells the visitor about room {i}, its paintings and its view." for i in range(1, 13)
)


@pytest.fixture()
def segmenting_engine(tiny_dir: Path, cache_dir: Path) -> TTSEngine:
    """A generation cap of 160 frames (12.8 s): the long text needs several generations."""
    return TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", max_new_tokens=160)
    )


def test_a_long_text_is_spoken_whole_as_segments_each_equal_to_qwen_tts(segmenting_engine: TTSEngine) -> None:
    engine = segmenting_engine
    request = engine.request_for(LONG_TEXT, "Ryan", "english")
    segments = engine.segments(request.text)
    assert len(segments) >= 3 and all(engine.frame_budget(s) < 160 for s in segments)
    handle = engine.submit(request, "long", stream=False)
    audio = np.concatenate(list(handle))
    end = handle.end
    assert end.error is None and end.segments == len(segments) and len(audio) == end.frames * 1920
    expected = [reference(engine, SynthesisRequest(s, "ryan", "english"))[0] for s in segments]
    np.testing.assert_array_equal(end.codes, np.concatenate(expected))
    assert len(set(end.slots)) == 1  # every segment ran in the request's one slot


def test_with_end_of_speech_suppressed_every_segment_runs_to_its_own_budget(segmenting_engine: TTSEngine) -> None:
    engine = segmenting_engine
    with torch.inference_mode():
        engine.scheduler.weights.suppress[CODEC_EOS] = True
    try:
        request = engine.request_for(LONG_TEXT, "Ryan", "english")
        result = engine.synthesize(request)
    finally:
        with torch.inference_mode():
            engine.scheduler.weights.suppress[CODEC_EOS] = False
    budgets = [engine.frame_budget(s) for s in engine.segments(LONG_TEXT)]
    assert result.frames == sum(budgets) > 160  # far past one generation's cap, nothing cut off
    assert result.truncated  # each segment stopped at its budget, as the header will say
    assert result.segments == len(budgets)
