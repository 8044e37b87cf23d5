"""Codec frames to audio, off the step loop: a thread of its own (and on a GPU a CUDA stream of its own),
so talker steps never wait for the speech decoder.

Each window is decoded with left context (frames already sent), and only its new frames' samples are
handed on. Windows of the same length are decoded as one batch. Streams' windows go before whole files',
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

if TYPE_CHECKING:
    from tts_service.decoder_process import DecoderProcess

logger = logging.getLogger(__name__)

# Decoding order: streams before whole files; within a class, earliest deadline first, then first in first
# out. A request's items always go to the same class, and `put` never places a unit before an earlier unit
# of any of its requests, so each request's chunks and end leave in order.
STREAM = 0  # a listener hears each chunk as it comes
WHOLE_FILE = 1  # nobody hears anything before the last chunk


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
    ) -> None:
        from tts_service.streaming_decoder import StreamingDecoder

        self.decoder = decoder
        self.streaming = StreamingDecoder(decoder)
        self.worker = worker  # a CPU decoder in its own process, or None: this process decodes
        self.samples_per_frame = samples_per_frame
        self.device = device
        self.threaded = threaded
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

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # OpenMP teams in a second thread are slow; one core each runs best
        while True:
            *_, items = self._queue.get()
            self._process(items)

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
        groups: dict[Any, list[Window]] = {}
        for window in windows:  # stateful windows one by one (each its own history), the rest by length
            groups.setdefault(id(window) if window.state is not None else len(window.codes), []).append(window)
        for group in groups.values():
            try:
                if group[0].state is not None:
                    audio = self.decode_stateful(group[0].state, group[0].codes)
                else:
                    audio = self.decode([w.codes for w in group])
            except Exception as exc:
                logger.exception("decoding failed for %d requests", len(group))
                for window in group:
                    self.on_error(window.handle, f"{type(exc).__name__}: {exc}")
                continue
            spf = self.samples_per_frame
            for window, wav in zip(group, audio, strict=True):
                if window.handle.end is None:
                    window.handle._put(np.ascontiguousarray(wav[window.context * spf : len(window.codes) * spf]))

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
        if self.worker is not None:
            return self.worker.decode_stateful(state, codes)
        host = torch.from_numpy(codes[None]).transpose(1, 2)
        if self.stream is None:
            return self.streaming.decode(state, host).float().numpy()
        with torch.cuda.stream(self.stream):
            return self.streaming.decode(state, host.to(self.device)).float().cpu().numpy()

    # ---- CUDA graphs of the decoder for its common window shapes -----------------------------------
    def capture(self, lengths: tuple[int, ...], batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> None:
        """Capture the decoder for windows of these frame counts (e.g. a stream's steady chunk plus its
        left context) at these batch sizes. Any other shape is decoded eagerly. If the decoder cannot be
        captured (a host sync inside), it stays eager and says so."""
        if self.stream is None:
            return
        self._graphs, self.graph_batches = {}, tuple(sorted(batches))
        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode(), torch.cuda.stream(self.stream):
                for length in lengths:
                    for batch in self.graph_batches:
                        static_in = torch.zeros(batch, 16, length, dtype=torch.long, device=self.device)
                        for _ in range(2):
                            self.decoder(static_in)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                            static_out = self.decoder(static_in).squeeze(1).float()
                        self._graphs[(batch, length)] = (static_in, static_out, graph)
            self.graph_lengths = tuple(lengths)
            logger.info("captured %d CUDA graphs of the speech decoder (windows %s)", len(self._graphs), lengths)
        except Exception:
            logger.warning("the speech decoder could not be captured as a CUDA graph; decoding eagerly", exc_info=True)
            self._graphs, self.graph_lengths = None, ()

    def _graph_for(self, batch: int, length: int):
        if not self._graphs or length not in self.graph_lengths:
            return None
        for size in self.graph_batches:
            if size >= batch:
                return self._graphs.get((size, length))
        return None
