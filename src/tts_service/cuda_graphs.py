"""The frame step as CUDA graphs: one per (batch bucket, attended-length bucket, sampling on/off).

A frame is thousands of small kernels; launched one by one from Python the GPU idles between them.
Replaying a captured graph launches them all at once. Graphs need fixed shapes, so the step's two
shapes are rounded up to buckets: the window of slots `n` (rows beyond the active ones are free slots,
which compute harmlessly in place) and the number of keys attended to (`kv_len`, masked per row).
All graphs are captured at start-up, before the service reports ready, into one shared memory pool.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence

import torch

from tts_service import frame_step as fs

logger = logging.getLogger(__name__)


def batch_buckets(slots: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64 and of 16 beyond, ending exactly at `slots`."""
    buckets, size = [], 1
    while size < min(slots, 8):
        buckets.append(size)
        size *= 2
    size = 8
    while size < slots:
        buckets.append(size)
        size += 8 if size < 64 else 16
    buckets.append(slots)
    return sorted(set(buckets))


def kv_buckets(max_len: int, smallest: int = 128) -> list[int]:
    """Powers of two from `smallest`, ending exactly at `max_len`."""
    buckets, size = [], smallest
    while size < max_len:
        buckets.append(size)
        size *= 2
    buckets.append(max_len)
    return buckets


def bucket_for(value: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `value`."""
    index = bisect.bisect_left(buckets, value)
    if index == len(buckets):
        raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")
    return buckets[index]


class GraphedFrameStep:
    """A drop-in for `frame_step` that replays captured graphs; same signature, same results."""

    def __init__(
        self,
        weights: fs.Weights,
        state: fs.SlotState,
        batch_sizes: Sequence[int] | None = None,
        kv_lengths: Sequence[int] | None = None,
        step: Callable[..., tuple[torch.Tensor, torch.Tensor]] = fs.frame_step,
    ) -> None:
        self.weights, self.state, self.step = weights, state, step
        self.batch_sizes = list(batch_sizes or batch_buckets(state.slots))
        self.kv_lengths = list(kv_lengths or kv_buckets(state.max_len))
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def capture_all(self) -> float:
        """Capture every bucket combination (all slots must be free: the warm-up steps run for real
        on the idle slots, which any later prefill resets). Returns the seconds it took."""
        started = time.perf_counter()
        for sample in (False, True):
            for kv_len in self.kv_lengths:
                for n in self.batch_sizes:
                    self._capture(n, kv_len, sample)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        logger.info(
            "captured %d CUDA graphs of the frame step (batch %s x keys %s x sampling on/off) in %.1f s",
            len(self.graphs),
            self.batch_sizes,
            self.kv_lengths,
            elapsed,
        )
        return elapsed

    def _capture(self, n: int, kv_len: int, sample: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        key = (n, kv_len, sample)
        if key not in self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # warm-up: allocator, library handles, kernel selection
                    self.step(self.weights, self.state, n, kv_len, sample)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
                frames, done = self.step(self.weights, self.state, n, kv_len, sample)
            self.graphs[key] = (graph, frames, done)
        return self.graphs[key]

    def __call__(
        self, weights: fs.Weights, state: fs.SlotState, n: int, kv_len: int, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bucket_n = bucket_for(n, self.batch_sizes)
        bucket_kv = bucket_for(kv_len, self.kv_lengths)
        graph, frames, done = self._capture(bucket_n, bucket_kv, sample)
        graph.replay()
        return frames[:n], done[:n]
