"""Does this CPU give a row of a product the same bits whatever the product's row count? Measured at
start-up, for the model's own weight shapes and the engine loop's thread count, because it is a property
of the BLAS build and the processor, not of PyTorch: on an AMD EPYC, MKL gives every row the same bits
from 4 rows on with the weights held as transposed views; on an Intel Sapphire Rapids (AVX-512, AMX)
the same views give other bits from 6 to 16 rows on, while the same weights held contiguous ([in, out])
give the same bits at every count up to 128 and more padded to 4 rows, and up to 32 (as far as checked)
padded to 2. So the engine tries layouts, the least padding first, and keeps the first that holds
(docs/PERFORMANCE.md, seventeenth and twentieth sessions)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from tts_service.verdict_store import VerdictStore

logger = logging.getLogger(__name__)

# The checks' names in a VerdictStore
PRODUCT_CHECK = "product layout"
DECODER_CHECK = "stateful decoder windows"

# The decoder check's verdicts in this process, by the decoder's parameter shapes and the check's sizes:
# the verdict is a property of the CPU's kernels for those shapes, and a service's models (custom voice,
# clone, design) share one speech tokenizer's decoder, so the second and third loads need not pay ~1 s.
_decoder_verdicts: dict[tuple, int | None] = {}


@contextlib.contextmanager
def _measuring(threads: int) -> Iterator[None]:
    """Inference mode on `threads` intra-op threads (as the code measured runs), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class ProductShape:
    """One weight the frame step multiplies by: [rows, in] @ [in, out] (+ bias)."""

    inputs: int
    outputs: int
    bias: bool = False


@dataclass(frozen=True)
class ProductLayout:
    """How the step's weights are held, and the fewest rows each product runs over (zero rows added)."""

    contiguous: bool  # [in, out] contiguous; else transposed views of the model's [out, in] weights
    min_rows: int


def rows_keep_their_bits(
    shapes: Iterable[ProductShape],
    layout: ProductLayout,
    max_rows: int,
    threads: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> bool:
    """Whether, for every shape, every row of a product of 1 to `max_rows` rows (`row_counts`; fewer than
    `layout.min_rows` padded to it), at every position, has the bits that row has at position 0 of a product of
    min_rows rows: what a request stepped alone computes. Random values: which kernel runs depends on
    the shapes, strides and thread count, not on the values."""
    generator = torch.Generator().manual_seed(seed)
    with _measuring(threads):
        return all(_shape_keeps_bits(shape, layout, max_rows, dtype, generator) for shape in shapes)


def _shape_keeps_bits(
    shape: ProductShape, layout: ProductLayout, max_rows: int, dtype: torch.dtype, generator: torch.Generator
) -> bool:
    weight = (torch.randn(shape.outputs, shape.inputs, generator=generator) / shape.inputs**0.5).to(dtype)
    weight_t = weight.t().contiguous() if layout.contiguous else weight.t()
    bias = torch.randn(shape.outputs, generator=generator).to(dtype) if shape.bias else None
    rows = torch.randn(max_rows, shape.inputs, generator=generator).to(dtype)

    def product(x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x, (0, 0, 0, max(0, layout.min_rows - x.shape[0])))
        out = torch.mm(padded, weight_t) if bias is None else torch.addmm(bias, padded, weight_t)
        return out[: x.shape[0]]

    alone = [product(rows[i : i + 1])[0] for i in range(max_rows)]
    for count in row_counts(max_rows):
        together = product(rows[:count])
        if not all(torch.equal(together[i], alone[i]) for i in range(count)):
            logger.debug("%s, %s: a row's bits change at %d rows", shape, layout, count)
            return False
    return True


def row_counts(max_rows: int) -> list[int]:
    """The row counts checked: every one up to 32 (the default slots), then a few more up to `max_rows`
    (the rows whose bits change did so in runs of counts wherever measured, and checking every count
    costs the square of the slots: minutes at the 1.7B sizes with 128)."""
    counts = set(range(1, min(max_rows, 32) + 1)) | {max_rows}
    counts |= {count for count in (40, 48, 56, 64, 80, 96, 112, 128, 192, 256) if count < max_rows}
    return sorted(counts)


def choose_layout(
    shapes: Sequence[ProductShape],
    slots: int,
    threads: int,
    paddings: Sequence[int],
    fallback_rows: int,
    dtype: torch.dtype = torch.float32,
    store: VerdictStore | None = None,
) -> ProductLayout | None:
    """The first layout under which rows keep their bits up to `slots` rows, the least padding first: for
    each of `paddings` (ascending), transposed views (what the model's weights already are), then
    contiguous copies; then each padded to `fallback_rows` (every product at one size). None if none holds.
    Read from `store` when this machine measured it before, else measured and kept there."""
    candidates = [ProductLayout(contiguous, rows) for rows in paddings for contiguous in (False, True)]
    candidates += [ProductLayout(False, fallback_rows), ProductLayout(True, fallback_rows)]

    def measure() -> list | None:
        holds = (layout for layout in candidates if rows_keep_their_bits(shapes, layout, slots, threads, dtype))
        chosen = next(holds, None)
        return None if chosen is None else [chosen.contiguous, chosen.min_rows]

    arguments = (tuple(shapes), slots, threads, tuple(paddings), fallback_rows, str(dtype))
    verdict, how = _kept_or_measured(store, PRODUCT_CHECK, arguments, _a_layout, measure)
    layout = None if verdict is None else ProductLayout(*verdict)
    if layout is not None:
        logger.info(
            "batch invariance: %s keeps every row's bits from 1 to %d rows on this CPU (%s)", layout, slots, how
        )
    return layout


def _kept_or_measured(
    store: VerdictStore | None, check: str, arguments: Any, valid: Callable[[Any], bool], measure: Callable[[], Any]
) -> tuple[Any, str]:
    """The verdict this machine kept in `store` for `check` with these arguments, else `measure()`'s (kept
    there); and how it was had, for the log."""
    kept = store.get(check, arguments, valid) if store is not None else None
    if kept is not None:
        return kept["verdict"], (
            f"as this machine measured it on {kept.get('measured')} in {kept.get('seconds')} s; kept in {store.path}"
        )
    started = time.perf_counter()
    verdict = measure()
    seconds = time.perf_counter() - started
    if store is not None:
        store.put(check, arguments, verdict, seconds)
    return verdict, f"checked in {seconds:.2f} s"


def _a_layout(verdict: Any) -> bool:
    """A kept product-layout verdict: none holds (None), or [contiguous, min_rows]."""
    if verdict is None:
        return True
    if not (isinstance(verdict, list) and len(verdict) == 2):
        return False
    contiguous, min_rows = verdict
    return isinstance(contiguous, bool) and type(min_rows) is int and min_rows >= 1


def decoder_batch_min_frames(
    streaming: Any,
    sizes: Sequence[int],
    limit: Callable[[int], int],
    threads: int = 1,
    seed: int = 0,
    store: VerdictStore | None = None,
) -> int | None:
    """The fewest frames (one of `sizes`) from which stateful windows decoded together give every stream
    the bits it has decoded alone, for that size and every larger one: a first window and one with history,
    `limit(size)` rows together (the most that are batched; fewer rows gave the same verdict wherever
    measured). None: not even at the largest. `streaming` is a
    `streaming_decoder.StreamingDecoder`; `threads` as the decoder runs. The decoder's own products run
    over rows x frames rows, so this is the same property of the CPU as `rows_keep_their_bits`. Remembered
    per process for decoders of the same parameter shapes, and across restarts in `store`."""
    sizes = sorted(sizes)
    key = (_parameter_shapes(streaming.decoder), tuple((size, limit(size)) for size in sizes), threads, seed)
    if key in _decoder_verdicts:
        logger.info(
            "batch invariance: stateful decoder windows keep their bits batched from %s frames on (as measured "
            "for an earlier model of these shapes)",
            _decoder_verdicts[key],
        )
        return _decoder_verdicts[key]

    def keeps_bits(size: int) -> bool:
        with torch.inference_mode():  # (per thread)
            return _decoder_keeps_bits(streaming, size, limit(size), torch.Generator().manual_seed(seed + size))

    def measure() -> int | None:
        # Each length on a thread of its own, as many at once as there are cores: at the released sizes this
        # check is the longest part of a first CPU start (75 to 95 s on a 2-core EPYC, one length after another)
        workers = min(len(sizes), _usable_cores())
        with _measuring(threads), ThreadPoolExecutor(workers, thread_name_prefix="decoder-check") as pool:
            holds = dict(zip(sizes, pool.map(keeps_bits, sizes), strict=True))
        lowest = None
        for size in reversed(sizes):  # from the longest down: the first that fails ends the run that holds
            if not holds[size]:
                break
            lowest = size
        return lowest

    lowest, how = _kept_or_measured(
        store, DECODER_CHECK, key, lambda verdict: verdict is None or verdict in sizes, measure
    )
    logger.info(
        "batch invariance: stateful decoder windows of %s frames keep their bits batched from %s frames on (%s)",
        sizes,
        lowest,
        how,
    )
    _decoder_verdicts[key] = lowest
    return lowest


def _usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one, as on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _parameter_shapes(module: torch.nn.Module) -> tuple:
    """What the decoder's kernels are chosen by: each parameter's and buffer's name, shape and dtype."""
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    return tuple((name, tuple(tensor.shape), str(tensor.dtype)) for name, tensor in tensors)


def _decoder_keeps_bits(streaming: Any, size: int, rows: int, generator: torch.Generator) -> bool:
    if rows < 2:
        return True  # never batched
    codes = torch.randint(0, 2048, (rows, 16, 2 * size), generator=generator)
    chunks = [codes[:, :, k * size : (k + 1) * size] for k in (0, 1)]
    states = [streaming.new_state() for _ in range(rows + 1)]
    together = torch.cat([streaming.decode_many(states[:rows], chunk) for chunk in chunks], dim=-1)
    for row in range(rows):
        states[rows] = streaming.new_state()
        alone = torch.cat([streaming.decode(states[rows], chunk[row : row + 1]) for chunk in chunks], dim=-1)
        if not torch.equal(together[row], alone[0]):
            return False
    return True
