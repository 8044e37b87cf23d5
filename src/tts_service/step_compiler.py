"""The frame step through Inductor (`TTS_COMPILE_STEP`): fused kernels in place of ~5,000 dispatched ops.

Why: run eagerly, a frame is bound by per-op overhead, not arithmetic. On a CPU that is about 4,500
Python-level torch calls per frame, each also taking the GIL back from the decoder thread; on a GPU,
about 6,000 kernel launches even inside a CUDA graph. Inductor fuses the norms, RoPE, SiLU-mul and the
sampling rules (docs/PERFORMANCE.md has the measured speed-ups).

Shapes. A step's shapes are the window `n` and the attended keys `kv_len`, and both change from step
to step. One compile per shape costs minutes at the real sizes, so the step is compiled once with
dynamic shapes: dynamo specializes the first call and marks `n` and `kv_len` dynamic once they change.
`warm_up` calls the step in a fixed order on the idle slots, which leaves graphs for every shape:
n = 1 (PyTorch specializes sizes of 1) and n >= 2, each for any kv_len. This happens at start-up,
before the service reports ready. While serving, a shape that would need a new compile runs the eager
step instead (and the log says so), so no request ever waits for the compiler.

On a GPU, the CUDA graphs (`cuda_graphs.py`) capture the compiled step per bucket. The compile caches
(Inductor's FX graph cache and dynamo's record of which inputs are dynamic) go to
`TORCHINDUCTOR_CACHE_DIR`, on the data volume in the image, so a restart compiles much less.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from tts_service import frame_step as fs

logger = logging.getLogger(__name__)

# Each loaded model (custom voice, clone, design) has its own weights and graphs of the same function.
_RECOMPILE_LIMIT = 64


def warm_up_shapes(slots: int, max_len: int, min_window: int = 1, min_rows: int = 1) -> list[tuple[int, int]]:
    """(n, kv_len) calls, in order, that leave dynamic graphs for every shape the scheduler asks for: n
    from `min_window` (its narrowest step) to `slots`. First static, then kv_len changed (kv_len becomes
    dynamic), then n changed (n >= 2 dynamic); from n = 1, n = 1 again with yet another kv_len (the n = 1
    graph with kv_len dynamic). Then n past the products' row padding `min_rows` where smaller n are
    stepped (below it the graph pads, so it is guarded on n < min_rows); from n = 1, past at least 4, as
    on a GPU. Lengths are the scheduler's multiples of 32, within the slots' positions."""
    short, long = min(32, max_len), min(64, max_len)
    first = max(1, min(min_window, slots))
    shapes = [(first, short), (first, long)]
    if first == 1 and slots >= 2:
        shapes += [(2, long), (min(3, slots), short), (1, min(96, max_len))]
    elif first < slots:
        shapes.append((first + 1, short))
    padded = max(min_rows, fs.INVARIANT_MIN_ROWS) if first == 1 else min_rows
    if first < padded <= slots:
        shapes.append((min(slots, padded + 1), long))
    return shapes


class CompiledFrameStep:
    """A drop-in for `frame_step` (same signature, same results up to fused-kernel rounding), compiled
    with `fullgraph=True`; `warm_up` must run before serving."""

    def __init__(self, backend: str = "inductor") -> None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        self.backend = backend
        self._compiled = torch.compile(fs.frame_step, fullgraph=True, dynamic=None, backend=backend)
        self.warm = False  # compiles allowed until warm_up has run; after it, a missing shape runs eagerly
        self.eager_calls = 0

    def warm_up(
        self, weights: fs.Weights, state: fs.SlotState, sample: bool, threads: int | None, min_window: int = 1
    ) -> float:
        """Compile for every shape from `min_window` rows (all slots must be free: the calls run for real
        on the idle slots, which any later prefill resets). `threads`: the engine loop's intra-op threads,
        which the graphs are guarded on (None: leave as is). Returns the seconds it took."""
        started = time.perf_counter()
        shapes = warm_up_shapes(state.slots, state.max_len, min_window, weights.talker.min_rows)
        outer = torch.get_num_threads()
        try:
            torch.set_num_threads(threads or outer)
            with torch.inference_mode():
                for n, kv_len in shapes:
                    self._compiled(weights, state, n, kv_len, sample)
        finally:
            torch.set_num_threads(outer)
        self.warm = True
        elapsed = time.perf_counter() - started
        logger.info(
            "compiled the frame step (%s, %s) for shapes %s in %.1f s",
            self.backend,
            "sampling" if sample else "greedy",
            shapes,
            elapsed,
        )
        return elapsed

    def __call__(
        self, weights: fs.Weights, state: fs.SlotState, n: int, kv_len: int, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.warm:
            return self._compiled(weights, state, n, kv_len, sample)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._compiled(weights, state, n, kv_len, sample)
        except RuntimeError as exc:  # raised before anything runs: the guards are checked first
            if "fail_on_recompile" not in str(exc):
                raise
        self.eager_calls += 1
        if self.eager_calls == 1:
            logger.warning(
                "the compiled frame step has no graph for n=%d kv_len=%d sample=%s; running it eagerly",
                n,
                kv_len,
                sample,
            )
        return fs.frame_step(weights, state, n, kv_len, sample)


def compiled_step(
    weights: fs.Weights,
    state: fs.SlotState,
    sample: bool,
    threads: int | None,
    min_window: int = 1,
    backend: str = "inductor",
) -> Callable:
    """The frame step compiled and warmed up for the scheduler's shapes (steps of `min_window` rows and
    more) and threads."""
    step = CompiledFrameStep(backend)
    step.warm_up(weights, state, sample, threads, min_window)
    return step
