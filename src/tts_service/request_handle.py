"""A request as the engine runs it (`Job`), and what its caller holds while it runs (`RequestHandle`):
float32 chunks, iterable from a thread or an event loop, then its `RequestEnd`."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np

from tts_service.stream_plan import ChunkPlan
from tts_service.voice_prompt import VoicePrompt


@dataclass(frozen=True)
class Job:
    """A validated request as the engine runs it: segments of text, the model's voice keys, a seed."""

    segments: tuple[str, ...]
    speaker: str
    language: str
    instruct: str
    seed: int
    plan: ChunkPlan
    budgets: tuple[int, ...]  # most frames per segment
    voice: VoicePrompt | None = None  # a cloned voice (Base models), in place of a speaker


@dataclass(frozen=True)
class RequestEnd:
    """The last item of every request."""

    frames: int
    truncated: bool  # some segment stopped at its frame budget rather than at end of speech
    steps: int  # decode steps this request took part in
    shared_steps: int  # of those, steps shared with at least one other request
    max_batch: int  # the largest step batch it shared
    segments: int = 1
    error: str | None = None
    cancelled: bool = False
    codes: np.ndarray | None = None  # [frames, 16]: every codec frame generated, all segments
    slots: tuple[int, ...] = ()  # the KV slot each segment was prefilled into (compaction may move it)


class RequestHandle:
    """What `StepScheduler.submit` returns: iterate it (sync or async) for float32 chunks; then `end`."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request_id = request_id
        self.cancelled = threading.Event()
        self.end: RequestEnd | None = None
        # Where the time to first audio goes (time.perf_counter): submitted, prefilled (launched, on a
        # GPU), first_frame (read back), first_window (queued to the decoder), first_audio (handed over).
        self.timeline: dict[str, float] = {"submitted": time.perf_counter()}
        self._ending = threading.Lock()
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def _put(self, item: np.ndarray | RequestEnd) -> None:
        if not isinstance(item, RequestEnd):
            self.timeline.setdefault("first_audio", time.perf_counter())
        if self._loop is not None and self._async_queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone: it is not listening any more
                self.cancelled.set()
        else:
            self._queue.put(item)

    def cancel(self) -> None:
        """Stop generating for this request; its slot is freed before the next step."""
        self.cancelled.set()

    def deliver_end(self, end: RequestEnd) -> bool:
        """Hand over the request's end, once (the engine and the decoder may both try); False if late."""
        with self._ending:
            if self.end is not None:
                return False
            self.end = end
        self._put(end)
        return True

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if isinstance(item, RequestEnd):
                self.end = item
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[np.ndarray]:
        assert self._async_queue is not None, "submit(..., loop=...) for async iteration"
        try:
            while True:
                item = await self._async_queue.get()
                if isinstance(item, RequestEnd):
                    self.end = item
                    return
                yield item
        finally:
            if self.end is None:  # the consumer stopped early
                self.cancel()

    def collect(self) -> np.ndarray:
        """Drain a synchronous handle: the whole waveform."""
        chunks = list(self)
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
