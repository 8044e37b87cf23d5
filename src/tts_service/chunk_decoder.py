"""Codec frames to audio, off the step loop: a thread of its own (and on a GPU a CUDA stream of its own),
so talker steps never wait for the speech decoder.

Each window is decoded with left context (frames already sent) or from its stream's carried decoder
state, and only its new frames' samples are handed on. Windows of the same length are decoded as one
batch, stateful ones of different streams too (up to `stateful_batch_limit`: on a CPU a batch gains only
while it is small). Streams' windows go before whole files',
and among them the one whose listener runs out of audio first (its deadline): a stream already playing
with seconds in hand waits for a new stream's first chunk, one about to run dry does not. Per request,
chunks and the request's end leave in the order they were submitted.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tts_service.decoder_process import LostStates

if TYPE_CHECKING:
    from tts_service.decoder_process import DecoderProcess

logger = logging.getLogger(__name__)

# Decoding order: streams before whole files; within a class, earliest deadline first, then first in first
# out. A request's items always go to the same class, and `put` never places a unit before an earlier unit
# of any of its requests, so each request's chunks and end leave in order.
STREAM = 0  # a listener hears each chunk as it comes
WHOLE_FILE = 1  # nobody hears anything before the last chunk

# Stateful windows decoded as one batch: at most this many rows and frames in all. Measured on a CPU,
# `tiny`, one thread (batched against one by one): 4-frame chunks 1.7x at 8 rows, 8 frames 1.6x at
# 8 rows, 16 frames 1.2x at 4, 32 frames 1.05x at 2 and 0.5x at 16 (the batch outgrows the caches).
STATEFUL_BATCH_ROWS = 8
STATEFUL_BATCH_FRAMES = 64
# Shorter windows are decoded alone: a seed must replay the same bytes in any company, and with 1 or 2
# frames a row's matrix products come out different in the last bits when batched (MKL picks other
# kernels for so few rows); from 4 frames they are the same bits on an AMD EPYC, from 8 on a Sapphire
# Rapids, so with batch invariance the scheduler measures it at start-up (`batch_invariance.
# decoder_batch_min_frames`). Convolutions run row by row for the same reason (streaming_decoder).
STATEFUL_BATCH_MIN_FRAMES = 4
# A stream's window with this much time in hand may wait for a batch (a batch of 8 small chunks takes
# tens of milliseconds on a CPU).
BATCH_SLACK_S = 0.1
_LAST = 2  # `close`'s mark: after every unit of either class


def stateful_batch_limit(frames: int, min_frames: int = STATEFUL_BATCH_MIN_FRAMES) -> int:
    """How many stateful windows of `frames` frames are decoded as one batch (alone below `min_frames`)."""
    if frames < min_frames:
        return 1
    return max(1, min(STATEFUL_BATCH_ROWS, STATEFUL_BATCH_FRAMES // max(frames, 1)))


@dataclass(eq=False)  # compared by identity
class Window:
    """`codes[context:]` are new; `codes[:context]` were sent already (or are a cloned voice's reference
    frames) and only condition the decoder. With a `state` (a stateful stream) the state carries the
    history, and a context is only the reference frames leading into a request's first window."""

    handle: Any  # RequestHandle
    codes: np.ndarray  # [frames, 16]
    context: int
    state: Any = None  # streaming_decoder.DecoderState
    deadline: float = 0.0  # time.perf_counter() by which its listener needs it (streams)


@dataclass(eq=False)
class Ending:
    """Sent after a request's last window: calls `finish` (which hands the request its end)."""

    handle: Any
    finish: Callable[[], None]
    deadline: float = 0.0


class ChunkDecoder:
    """Queue windows (or endings) with `put`; `threaded` runs them on a thread of their own (with its own
    CUDA stream on a GPU; with one intra-op thread on the CPU, beside the engine loop's one). With a
    `worker` process that thread only waits for it, so the decoding itself holds no GIL here."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        samples_per_frame: int,
        device: torch.device,
        threaded: bool,
        worker: DecoderProcess | None = None,
        batched: bool = True,
        batch_min_frames: int = STATEFUL_BATCH_MIN_FRAMES,
    ) -> None:
        from tts_service.streaming_decoder import StreamingDecoder

        self.decoder = decoder
        self.streaming = StreamingDecoder(decoder)
        self.worker = worker  # a CPU decoder in its own process, or None: this process decodes
        self.samples_per_frame = samples_per_frame
        self.device = device
        self.threaded = threaded
        # False: every window is decoded alone, so its bits cannot depend on what it was batched with
        # (the scheduler's InvariancePlan.decode_alone).
        self.batched = batched
        self.batch_min_frames = batch_min_frames  # stateful windows of fewer frames are decoded alone
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.on_error: Callable[[Any, str], None] = lambda handle, error: None
        self.graph_lengths: tuple[int, ...] = ()  # window lengths with captured graphs (none until capture)
        self.graph_batches: tuple[int, ...] = ()
        self._graphs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] | None = None
        self._queue: queue.PriorityQueue[tuple[int, float, int, list[Window | Ending]]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._last_key: dict[Any, float] = {}  # each queued request's latest unit's deadline key
        self._thread: threading.Thread | None = None
        self.busy_seconds = 0.0  # spent decoding (or waiting for the worker process), summed

    def put(self, items: list[Window | Ending], priority: int = STREAM) -> None:
        """Queue items, decoded after every queued item of a more urgent class (`STREAM`, `WHOLE_FILE`), and
        within their class after those with an earlier deadline, then after the earlier ones."""
        if not items:
            return
        if not self.threaded:
            self._process(items)
            return
        # Windows without state are decoded together (one call per length): they stay one unit. Stateful
        # windows are decoded one at a time anyway, so each is queued alone: a more urgent window then
        # waits for at most one decode in progress, not for the rest of a whole hand-off. Endings follow
        # every window in `items`, and their relative order is kept.
        # Requests that ended (done, failed or cancelled) are forgotten: none of their items is decoded now.
        self._last_key = {handle: key for handle, key in self._last_key.items() if handle.end is None}
        together = [item for item in items if isinstance(item, Window) and item.state is None]
        units = [together] if together else []
        units += [[item] for item in items if not (isinstance(item, Window) and item.state is None)]
        for unit in units:
            self._queue.put((priority, self._key(unit), next(self._order), unit))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tts-chunk-decoder", daemon=True)
            self._thread.start()

    def _key(self, unit: list[Window | Ending]) -> float:
        """A unit's place: its most urgent item's deadline, but never before an earlier unit of any of its
        requests (a shared unit holding one stream's next window and a new stream's first, due at once, must
        not overtake the first stream's previous window). Its requests' later units then come after it."""
        key = max([min(item.deadline for item in unit), *(self._last_key.get(item.handle, 0.0) for item in unit)])
        for item in unit:
            if isinstance(item, Ending):
                self._last_key.pop(item.handle, None)  # nothing of this request follows its end
            else:
                self._last_key[item.handle] = key
        return key

    def close(self, timeout_s: float = 10.0) -> bool:
        """Decode what is queued, then stop the thread (joined: see `StepScheduler.close`). A worker process,
        shared by the process's engines, is left running; it ends with this process. False if the thread
        outlived `timeout_s`."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        self._queue.put((_LAST, float("inf"), next(self._order), None))  # after every queued unit
        thread.join(timeout_s)
        return not thread.is_alive()

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # OpenMP teams in a second thread are slow; one core each runs best
        while True:
            entry = self._queue.get()
            if entry[-1] is None:  # `close`
                return
            self._process(self._with_companions(entry))

    def _with_companions(self, entry: tuple[int, float, int, list[Window | Ending]]) -> list[Window | Ending]:
        """A stateful window's unit plus the queued stateful windows of the same length it can be decoded
        with: other requests' next units (never one behind an earlier unit of its own request) of its
        class, in queue order, up to the batch limit. Every other unit goes back as it was.

        A batch takes longer than its first window alone. The queue's first window is its most urgent,
        so when it has `BATCH_SLACK_S` in hand any companion may join; when it is due, only companions
        that are due too (by its deadline, or late): a new stream's first chunk is not held up by streams
        with audio in hand, while streams that fell behind share one call."""
        priority, items = entry[0], entry[-1]
        first = items[0]
        if len(items) != 1 or not isinstance(first, Window) or first.state is None:
            return items
        limit = stateful_batch_limit(len(first.codes), self.batch_min_frames) if self.batched else 1
        queued: list[tuple[int, float, int, list[Window | Ending]]] = []
        while limit > 1:  # the whole queue, in order; what is not taken goes back unchanged
            try:
                queued.append(self._queue.get_nowait())
            except queue.Empty:
                break
        taken, passed = [first], {first.handle}
        now = time.perf_counter()
        due_by = float("inf") if first.deadline > now + BATCH_SLACK_S else max(first.deadline, now)
        for other in queued:
            unit = other[-1] or []  # None: `close`'s mark, which goes back
            window = unit[0] if unit else None
            if (
                len(taken) < limit
                and len(unit) == 1
                and isinstance(window, Window)
                and window.state is not None
                and len(window.codes) == len(first.codes)
                and other[0] == priority
                and (priority == WHOLE_FILE or window.deadline <= due_by)
                and window.handle not in passed
            ):
                taken.append(window)
            else:
                self._queue.put(other)
            passed.update(item.handle for item in unit)
        return taken

    def _process(self, items: list[Window | Ending]) -> None:
        started = time.perf_counter()
        try:
            self._decode_windows(items)
        finally:  # counted before any ending is delivered, so a request's caller sees its decoding counted
            self.busy_seconds += time.perf_counter() - started
        for item in items:
            if isinstance(item, Ending):
                item.finish()

    def _decode_windows(self, items: list[Window | Ending]) -> None:
        windows = [item for item in items if isinstance(item, Window) and item.handle.end is None]
        for group in self._groups(windows, self.batched, self.batch_min_frames):
            try:
                if group[0].state is not None:
                    audio = self.decode_stateful_many([w.state for w in group], [w.codes for w in group])
                else:
                    audio = self.decode([w.codes for w in group])
            except LostStates as exc:  # raised before decoding: the others go on without them
                logger.warning(
                    "%d streams lost their decoder state to a restart of the decoder process", len(exc.states)
                )
                lost = {id(state) for state in exc.states}
                for window in group:
                    if id(window.state) in lost:
                        self.on_error(window.handle, str(exc))
                self._decode_windows([window for window in group if id(window.state) not in lost])
                continue
            except Exception as exc:
                logger.exception("decoding failed for %d requests", len(group))
                for window in group:
                    self.on_error(window.handle, f"{type(exc).__name__}: {exc}")
                continue
            spf = self.samples_per_frame
            for window, wav in zip(group, audio, strict=True):
                if window.handle.end is None:
                    window.handle._put(np.ascontiguousarray(wav[window.context * spf : len(window.codes) * spf]))

    @staticmethod
    def _groups(
        windows: list[Window], batched: bool = True, min_frames: int = STATEFUL_BATCH_MIN_FRAMES
    ) -> list[list[Window]]:
        """Windows decoded together: stateless ones by length; stateful ones by length too, at most one per
        request (a request's next window goes to a later batch, so its chunks stay in order) and at most
        `stateful_batch_limit` per batch. Not `batched`: each alone."""
        if not batched:
            return [[window] for window in windows]
        groups: dict[tuple, list[Window]] = {}
        seen: dict[Any, int] = {}  # each request's stateful windows so far
        for window in windows:
            length = len(window.codes)
            if window.state is None:
                key: tuple = ("stateless", length)
            else:
                turn = seen[window.handle] = seen.get(window.handle, -1) + 1
                key = ("stateful", length, turn)
            groups.setdefault(key, []).append(window)
        batches: list[list[Window]] = []
        for key, group in groups.items():
            size = stateful_batch_limit(key[1], min_frames) if key[0] == "stateful" else len(group)
            batches += [group[start : start + size] for start in range(0, len(group), size)]
        return batches

    def new_state(self) -> Any:
        """A stream's decoder state, for `decode_stateful` (kept in the worker process when there is one)."""
        return self.streaming.new_state() if self.worker is None else self.worker.new_state()

    def wait_ready(self) -> None:
        """Return once decoding can start (a worker process has loaded its decoder)."""
        if self.worker is not None:
            self.worker.wait_ready()

    @torch.inference_mode()
    def decode(self, codes: list[np.ndarray]) -> np.ndarray:
        """Equal-length code windows [T, 16] -> float32 audio [b, T * samples_per_frame]."""
        if self.worker is not None:
            return self.worker.decode(codes)
        host = torch.from_numpy(np.stack(codes))
        if self.stream is None:
            return self.decoder(host.transpose(1, 2).clamp(min=0)).squeeze(1).float().numpy()
        with torch.cuda.stream(self.stream):
            batch = host.to(self.device).transpose(1, 2).clamp(min=0)
            graph = self._graph_for(batch.shape[0], batch.shape[2])
            if graph is None:
                wav = self.decoder(batch).squeeze(1).float()
            else:
                static_in, static_out, graph_obj = graph
                static_in[: batch.shape[0]].copy_(batch)
                graph_obj.replay()
                wav = static_out[: batch.shape[0]]
            return wav.cpu().numpy()  # waits for this stream only

    @torch.inference_mode()
    def decode_stateful(self, state: Any, codes: np.ndarray) -> np.ndarray:
        """The next chunk of one stateful stream: [T, 16] -> float32 audio [1, T * samples_per_frame]."""
        return self.decode_stateful_many([state], [codes])

    @torch.inference_mode()
    def decode_stateful_many(self, states: list[Any], codes: list[np.ndarray]) -> np.ndarray:
        """The next chunks of several stateful streams, equal lengths [T, 16], as one batch -> [b, T * spf]."""
        if self.worker is not None:
            return self.worker.decode_stateful_many(states, codes)
        host = torch.from_numpy(np.stack(codes)).transpose(1, 2)
        if self.stream is None:
            return self.streaming.decode_many(states, host).float().numpy()
        with torch.cuda.stream(self.stream):
            return self.streaming.decode_many(states, host.to(self.device)).float().cpu().numpy()

    # ---- CUDA graphs of the decoder for its common window shapes -----------------------------------
    def capture(self, lengths: tuple[int, ...], batches: tuple[int, ...] | None = None) -> None:
        """Capture the decoder for windows of these frame counts (e.g. a stream's steady chunk plus its
        left context) at these batch sizes (by default 1 to 32, or only 1 when not `batched`). Any other
        shape is decoded eagerly. A length the decoder cannot be captured at (a host sync inside) stays
        eager, and the log says so; the others keep their graphs."""
        if self.stream is None:
            return
        if batches is None:
            batches = (1, 2, 4, 8, 16, 32) if self.batched else (1,)
        self._graphs, self.graph_batches = {}, tuple(sorted(batches))
        pool = torch.cuda.graph_pool_handle()
        captured = []
        for length in lengths:
            try:
                with torch.inference_mode(), torch.cuda.stream(self.stream):
                    for batch in self.graph_batches:
                        static_in = torch.zeros(batch, 16, length, dtype=torch.long, device=self.device)
                        for _ in range(2):
                            self.decoder(static_in)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                            static_out = self.decoder(static_in).squeeze(1).float()
                        self._graphs[(batch, length)] = (static_in, static_out, graph)
                captured.append(length)
            except Exception:
                logger.warning(
                    "the speech decoder could not be captured as a CUDA graph for %d-frame windows; decoding them "
                    "eagerly",
                    length,
                    exc_info=True,
                )
                self._graphs = {key: value for key, value in self._graphs.items() if key[1] != length}
        self.graph_lengths = tuple(captured)
        logger.info("captured %d CUDA graphs of the speech decoder (windows %s)", len(self._graphs), self.graph_lengths)

    def _graph_for(self, batch: int, length: int):
        if not self._graphs or length not in self.graph_lengths:
            return None
        for size in self.graph_batches:
            if size >= batch:
                return self._graphs.get((size, length))
        return None
