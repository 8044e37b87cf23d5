"""The frame step as CUDA graphs: one per (batch bucket, attended-length bucket, sampling on/off); and a
joining prompt's prefill: one per prompt-length bucket.

A frame is thousands of small kernels; launched one by one from Python the GPU idles between them.
Replaying a captured graph launches them all at once. Graphs need fixed shapes, so the step's two
shapes are rounded up to buckets: the window of slots `n` (rows beyond the active ones are free slots,
which compute harmlessly in place) and the number of keys attended to (`kv_len`, masked per row; with
the Triton decode attention each row reads its own live keys, so that is one length, the cache's).
A prefill is about a thousand kernels too, on the way to a request's first audio: its prompt is
right-padded to its length bucket (the padding lands beyond the prompt, where no query looks).
All graphs are captured at start-up, before the service reports ready, into one shared memory pool.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from tts_service import frame_step as fs
from tts_service.sampling import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Prompts longer than this are prefilled eagerly: long prompts are rare (a long cloned reference), and
# there a prefill's own compute outweighs its launches.
PREFILL_GRAPH_LONGEST = 1024


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


def prompt_buckets(longest: int, smallest: int = 16) -> list[int]:
    """16, 32, 64, then each 1.5x or 1.33x the one before (96, 128, 192, 256, 384, ...), ending exactly at
    `longest`: a prompt is padded by at most half its length, where padding costs little (a prefill of one
    prompt reads every weight once whatever its length)."""
    buckets, size = [], smallest
    while size < longest:
        buckets.append(size)
        size = size * 2 if size < 64 else size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    buckets.append(longest)
    return buckets


def capture(run: Callable[[], T], pool: Any) -> tuple[Any, T]:
    """`run` warmed up twice on a side stream (allocator, library handles, kernel choice), then captured as
    a CUDA graph into `pool`. Returns the graph and what the captured call returned, which each replay
    overwrites in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
        out = run()
    return graph, out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        # a step whose attention reads each row's live keys has one length: the cache's
        live_keys = [state.max_len] if weights.talker.triton_attention else None
        self.kv_lengths = list(kv_lengths or live_keys or kv_buckets(state.max_len))
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
            graph, (frames, done) = capture(lambda: self.step(self.weights, self.state, n, kv_len, sample), self.pool)
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


@dataclass
class _PrefillGraph:
    """One prompt's prefill at a fixed length, and the static inputs its replay reads."""

    graph: Any
    prompt: torch.Tensor  # [1, length, H]: the prompt, zeros beyond it
    integers: torch.Tensor  # [8, 1], as `frame_step.prefill_values` orders them
    floats: torch.Tensor  # [5, 1]


class GraphedPrefill:
    """A drop-in for `frame_step.prefill` that replays one captured graph per prompt, one prompt after
    another, each padded to its length bucket. A prefill launched eagerly costs its ~1,000 launches from
    Python whatever the number of prompts, and a graph's replay costs its GPU time per prompt; so a group
    is replayed prompt by prompt only while the replays' measured times add up to less than one eager
    prefill's (measured at capture), and is prefilled eagerly as one batch beyond that. Prompts longer
    than the largest bucket, and lengths whose capture failed, are prefilled eagerly."""

    def __init__(
        self,
        weights: fs.Weights,
        state: fs.SlotState,
        lengths: Sequence[int] | None = None,
        pool: Any = None,
    ) -> None:
        self.weights, self.state = weights, state
        self.lengths = list(lengths or prompt_buckets(min(PREFILL_GRAPH_LONGEST, state.max_len - 1)))
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool
        self.graphs: dict[int, _PrefillGraph] = {}
        self.replay_s: dict[int, float] = {}  # a replay's seconds, by length bucket
        self.eager_s = 0.0  # one prompt's eager prefill at the shortest bucket, in seconds
        self.replayed = 0  # prompts prefilled by a graph (for tests and benchmarks)
        self.eager_groups = 0  # groups prefilled eagerly

    def capture_all(self, params: SamplingParams, slot: int = 0) -> float:
        """Capture every length bucket, running the prefill for real into the free `slot` (released after).
        Returns the seconds it took."""
        started = time.perf_counter()
        w, s = self.weights, self.state
        device, dtype = w.codec_head.device, w.codec_head.dtype
        width = w.codec_head.shape[1]
        probe = [torch.zeros(self.lengths[0], width, dtype=dtype, device=device)]
        for _ in range(2):  # the second is timed: the first pays for kernel choice and the allocator
            _synchronize(device)
            begun = time.perf_counter()
            fs.prefill(w, s, [slot], probe, [params])
            _synchronize(device)
            self.eager_s = time.perf_counter() - begun
        failed = []
        for length in self.lengths:
            prompt = torch.zeros(1, length, width, dtype=dtype, device=device)
            integers, floats = (t.to(device) for t in fs.prefill_values([slot], [length], [params]))
            try:
                graph, _ = capture(
                    lambda p=prompt, i=integers, f=floats, n=length: fs.prefill_rows(w, s, p, i, f, [n]), self.pool
                )
            except Exception as exc:  # this length stays eager; the others keep their graphs
                logger.warning("prefill of %d tokens stays eager: its capture failed (%s)", length, exc)
                failed.append(length)
                continue
            self.graphs[length] = _PrefillGraph(graph, prompt, integers, floats)
            for _ in range(2):  # the second is timed: the first uploads the graph
                _synchronize(device)
                begun = time.perf_counter()
                graph.replay()
                _synchronize(device)
                self.replay_s[length] = time.perf_counter() - begun
        fs.release(s, slot)
        elapsed = time.perf_counter() - started
        logger.info(
            "captured %d CUDA graphs of a prompt's prefill (lengths %s%s) in %.1f s; one replays in %.2f-%.2f ms, "
            "an eager prefill takes %.2f ms",
            len(self.graphs),
            sorted(self.graphs),
            f"; failed: {failed}" if failed else "",
            elapsed,
            min(self.replay_s.values(), default=0) * 1000,
            max(self.replay_s.values(), default=0) * 1000,
            self.eager_s * 1000,
        )
        return elapsed

    def _graph_for(self, length: int) -> _PrefillGraph | None:
        if length > self.lengths[-1]:
            return None
        return self.graphs.get(bucket_for(length, self.lengths))

    def __call__(
        self,
        weights: fs.Weights,
        state: fs.SlotState,
        slots: Sequence[int],
        prompts: Sequence[torch.Tensor],
        params: Sequence[SamplingParams],
    ) -> None:
        graphs = [self._graph_for(int(prompt.shape[0])) for prompt in prompts]
        replaying = sum(self.replay_s[g.prompt.shape[1]] for g in graphs if g is not None)
        if any(g is None for g in graphs) or (len(prompts) > 1 and replaying > self.eager_s):
            self.eager_groups += 1
            fs.prefill(weights, state, slots, prompts, params)
            return
        with torch.inference_mode():
            for graph, slot, prompt, param in zip(graphs, slots, prompts, params, strict=True):
                assert graph is not None
                length = prompt.shape[0]
                graph.prompt[0, :length].copy_(prompt)
                graph.prompt[0, length:].zero_()
                integers, floats = fs.prefill_values([slot], [length], [param])
                fs.copy_from_host(graph.integers, integers)
                fs.copy_from_host(graph.floats, floats)
                graph.graph.replay()
                self.replayed += 1
