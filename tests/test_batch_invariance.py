"""The start-up check that picks how the CPU step holds its weights, so that a row's bits do not depend on
how many rows share its products (`tts_service.batch_invariance`), and the contiguous layout it may pick."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.oracle import ORACLE_REQUESTS, reference
from tts_service import frame_step as fs
from tts_service.batch_invariance import (
    ProductLayout,
    ProductShape,
    choose_layout,
    row_counts,
    rows_keep_their_bits,
)
from tts_service.engine import TTSEngine
from tts_service.invariance_plan import InvariancePlan
from tts_service.scheduler import StepScheduler
from tts_service.settings import Settings

SHAPES = [ProductShape(64, 96), ProductShape(96, 64, bias=True)]


def test_the_check_catches_a_product_whose_rows_change_with_the_row_count(monkeypatch) -> None:
    """A BLAS that rounds differently from 6 rows on (as MKL does with transposed views on a Sapphire
    Rapids): the check rejects padding to 4 rows for 8 slots, accepts it for 5, and for 8 slots falls back
    to every product at 8 rows, where all rows take the same path."""
    mm = torch.mm

    def by_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # one row at a time: the same bits at any count
        out = torch.cat([mm(x[i : i + 1], w) for i in range(x.shape[0])])
        return out + 1e-3 if x.shape[0] >= 6 else out

    monkeypatch.setattr(torch, "mm", by_rows)
    monkeypatch.setattr(torch, "addmm", lambda b, x, w: by_rows(x, w) + b)
    assert not rows_keep_their_bits(SHAPES, ProductLayout(False, 4), max_rows=8, threads=1)
    assert rows_keep_their_bits(SHAPES, ProductLayout(False, 4), max_rows=5, threads=1)
    assert choose_layout(SHAPES, slots=8, threads=1, paddings=(4,), fallback_rows=8) == ProductLayout(False, 8)
    assert choose_layout(SHAPES, slots=5, threads=1, paddings=(4,), fallback_rows=5) == ProductLayout(False, 4)


def test_the_least_padding_that_holds_is_chosen(monkeypatch) -> None:
    """Padding to 2 rows is tried before 4, each with the model's own weights (transposed views) before
    contiguous copies. A BLAS like the Sapphire Rapids' (views round differently from 6 rows on, contiguous
    weights never): contiguous at 2 rows. One like the AMD EPYC's (1 to 3 rows take other kernels than 4
    and more, whatever the layout): views at 4 rows."""
    mm = torch.mm
    changes: list = [lambda x, w: not w.is_contiguous() and x.shape[0] >= 6]

    def by_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.cat([mm(x[i : i + 1], w) for i in range(x.shape[0])])
        return out + 1e-3 if changes[0](x, w) else out

    monkeypatch.setattr(torch, "mm", by_rows)
    monkeypatch.setattr(torch, "addmm", lambda b, x, w: by_rows(x, w) + b)
    paddings = fs.INVARIANT_ROW_PADDINGS
    assert paddings == (2, 4)
    assert choose_layout(SHAPES, slots=8, threads=1, paddings=paddings, fallback_rows=8) == ProductLayout(True, 2)
    changes[0] = lambda x, w: x.shape[0] < 4
    assert choose_layout(SHAPES, slots=8, threads=1, paddings=paddings, fallback_rows=8) == ProductLayout(False, 4)


def test_every_row_count_up_to_32_is_checked_and_a_sample_past_it() -> None:
    assert row_counts(8) == list(range(1, 9))
    assert row_counts(100) == [*range(1, 33), 40, 48, 56, 64, 80, 96, 100]


def test_the_plan_follows_the_check(monkeypatch) -> None:
    """What the CPU plan does with each verdict: the first layout that holds is kept (2 rows before 4,
    contiguous weights when only they hold), padding to every slot when only that holds, and the default
    with a warning when nothing does."""
    verdicts: dict[ProductLayout, bool] = {}
    monkeypatch.setattr(
        "tts_service.batch_invariance.rows_keep_their_bits",
        lambda shapes, layout, *args: verdicts.get(layout, False),
    )
    rows = fs.INVARIANT_MIN_ROWS

    def plan() -> InvariancePlan:
        return InvariancePlan.choose(True, on_cuda=False, slots=8, stateful_decoding=True, shapes=SHAPES)

    verdicts.update({ProductLayout(True, 2): True, ProductLayout(True, rows): True})
    assert plan() == InvariancePlan(2, True, False, 2, contiguous_weights=True)
    verdicts[ProductLayout(True, 2)] = False
    verdicts.update({ProductLayout(False, rows): False, ProductLayout(True, rows): True})
    assert plan() == InvariancePlan(rows, True, False, rows, contiguous_weights=True)
    verdicts.update({ProductLayout(True, rows): False, ProductLayout(False, 8): True})
    assert plan() == InvariancePlan(8, True, False, 8)
    verdicts.update({ProductLayout(False, 8): False, ProductLayout(True, 8): False})
    assert plan() == InvariancePlan(rows, True, False, rows)


def test_stateful_windows_are_batched_from_the_length_the_decoder_check_finds(engine: TTSEngine, monkeypatch) -> None:
    """The decoder's verdict: batched from the length it names, or every window alone when none holds."""
    scheduler = engine.scheduler  # its own plan, measured on this CPU, reaches its decoder
    assert scheduler.decoder.batch_min_frames == scheduler.invariance.stateful_batch_min_frames >= 4
    decoder = scheduler.model.speech_tokenizer.model.decoder
    lowest: list[int | None] = [8]
    monkeypatch.setattr("tts_service.invariance_plan.decoder_batch_min_frames", lambda *args, **kwargs: lowest[0])

    def plan() -> InvariancePlan:
        return InvariancePlan.choose(True, on_cuda=False, slots=8, stateful_decoding=True, speech_decoder=decoder)

    assert (plan().decode_alone, plan().stateful_batch_min_frames) == (False, 8)
    lowest[0] = None
    assert plan().decode_alone
    assert InvariancePlan.choose(True, False, 8, stateful_decoding=False, speech_decoder=decoder).decode_alone


def test_the_models_shapes_are_the_products_the_step_runs(engine: TTSEngine) -> None:
    w = engine.scheduler.weights
    products = [w.codec_head_t, *w.predictor_heads_t]
    products += [t for stack in (w.talker, w.predictor) for layer in stack.layers for t in _layer_products(layer)]
    if w.projection_t is not None:
        products.append(w.projection_t)
    shapes = {(s.inputs, s.outputs) for s in fs.product_shapes(engine.scheduler.model)}
    assert shapes == {tuple(t.shape) for t in products}


def _layer_products(layer: fs.LayerWeights) -> list[torch.Tensor]:
    return [layer.qkv_t, layer.o_t, layer.gate_up_t, layer.down_t]


@pytest.fixture(scope="module")
def contiguous_engine(tiny_dir: Path, cache_dir: Path) -> TTSEngine:
    """A greedy engine whose step holds its weights contiguous, whatever this CPU's check would pick."""
    engine = TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", decoder_worker="thread")
    )
    rows = fs.INVARIANT_MIN_ROWS
    engine.scheduler = StepScheduler(
        engine.model,
        slots=8,
        max_len=engine.scheduler.max_len,
        sampling=engine.sampling_defaults(),
        invariance=InvariancePlan(rows, True, False, rows, contiguous_weights=True),
        decoder_process=False,
    )
    return engine


def test_contiguous_weights_are_the_models_own_memory_and_give_qwen_tts_codes(contiguous_engine: TTSEngine) -> None:
    """The contiguous layout re-points qwen-tts's modules at the step's matrices (no second copy of the
    weights), and the engine's greedy codes still equal qwen-tts's own generate, alone and together."""
    engine = contiguous_engine
    w, talker = engine.scheduler.weights, engine.scheduler.model.talker
    layer, module = w.talker.layers[0], talker.model.layers[0]
    assert layer.qkv_t.is_contiguous() and layer.down_t.is_contiguous() and w.codec_head_t.is_contiguous()
    for weight_t, linear in (
        (layer.qkv_t, module.self_attn.k_proj),
        (layer.gate_up_t, module.mlp.up_proj),
        (layer.down_t, module.mlp.down_proj),
        (w.codec_head_t, talker.codec_head),
        (w.predictor_heads_t[3], talker.code_predictor.lm_head[3]),
    ):
        assert linear.weight.untyped_storage().data_ptr() == weight_t.untyped_storage().data_ptr()
    expected = {r.text: reference(engine, r)[0] for r in ORACLE_REQUESTS}
    handles = [engine.submit(r, f"contiguous-{i}", stream=False) for i, r in enumerate(ORACLE_REQUESTS)]
    for handle in handles:
        list(handle)
    alone = engine.submit(ORACLE_REQUESTS[2], "contiguous-alone", stream=False)
    list(alone)
    assert max(h.end.max_batch for h in handles) >= 2
    for handle, request in zip([*handles, alone], [*ORACLE_REQUESTS, ORACLE_REQUESTS[2]], strict=True):
        assert handle.end.error is None
        np.testing.assert_array_equal(handle.end.codes, expected[request.text])


def test_the_decoder_check_is_measured_once_per_process_for_decoders_of_the_same_shapes(
    engine: TTSEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A three-model service loads one speech tokenizer's decoder three times: the check runs for the first."""
    import copy

    import tts_service.batch_invariance as module
    from tts_service.chunk_decoder import stateful_batch_limit
    from tts_service.streaming_decoder import StreamingDecoder

    monkeypatch.setattr(module, "_decoder_verdicts", {})
    measured: list[int] = []
    real = module._decoder_keeps_bits

    def keeps_bits(streaming, size, rows, generator) -> bool:
        measured.append(size)
        return real(streaming, size, rows, generator)

    monkeypatch.setattr(module, "_decoder_keeps_bits", keeps_bits)
    decoder = engine.model.model.speech_tokenizer.model.decoder
    lowest = module.decoder_batch_min_frames(StreamingDecoder(decoder), (4, 8, 16, 32), stateful_batch_limit)
    assert sorted(measured) == [4, 8, 16, 32]  # measured

    measured.clear()
    twin = copy.deepcopy(decoder)  # another model's decoder: the same shapes, other weights
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.mul_(1.5)
    assert module.decoder_batch_min_frames(StreamingDecoder(twin), (32, 16, 8, 4), stateful_batch_limit) == lowest
    assert measured == []  # remembered
    module.decoder_batch_min_frames(StreamingDecoder(twin), (8, 16), stateful_batch_limit)
    assert sorted(measured) == [8, 16]  # other sizes: measured afresh


def test_the_decoder_check_decodes_its_lengths_at_once_with_the_decoder_processs_bits(
    engine: TTSEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window lengths are checked on threads of their own, one per core (a first CPU start at the released
    sizes: 75 s to 46 s on 2 cores), each on one intra-op thread in inference mode as the decoder process
    runs; a window decoded on such a thread has the bits it has on the main thread."""
    import threading

    import tts_service.batch_invariance as module
    from tts_service.chunk_decoder import stateful_batch_limit
    from tts_service.streaming_decoder import StreamingDecoder

    monkeypatch.setattr(module, "_decoder_verdicts", {})
    monkeypatch.setattr(module, "_usable_cores", lambda: 4)
    seen: dict[int, tuple] = {}
    real = module._decoder_keeps_bits

    def keeps_bits(streaming, size, rows, generator) -> bool:
        seen[size] = (threading.current_thread().name, torch.get_num_threads(), torch.is_inference_mode_enabled())
        return real(streaming, size, rows, generator)

    monkeypatch.setattr(module, "_decoder_keeps_bits", keeps_bits)
    streaming = StreamingDecoder(engine.model.model.speech_tokenizer.model.decoder)
    assert module.decoder_batch_min_frames(streaming, (4, 8, 16, 32), stateful_batch_limit) == 4
    names = {name for name, _, _ in seen.values()}
    assert sorted(seen) == [4, 8, 16, 32] and len(names) == 4 and all(n.startswith("decoder-check") for n in names)
    assert all(threads == 1 and inference for _, threads, inference in seen.values())

    codes = torch.randint(0, 2048, (1, 16, 12), generator=torch.Generator().manual_seed(5))
    with module._measuring(1):
        here = streaming.decode(streaming.new_state(), codes)
        with module.ThreadPoolExecutor(1) as pool:
            there = pool.submit(lambda: streaming.decode(streaming.new_state(), codes)).result()
    assert torch.equal(here, there)
