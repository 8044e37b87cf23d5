"""The engine loop: every request, streamed or not, is a row of one step batch that grows and shrinks.

One thread owns the model. Each turn of its loop:
1. rows whose client left are dropped; their slots are freed;
2. waiting requests (and long requests starting their next text segment) are prefilled together into
   free KV slots and join the batch;
3. one `frame_step` advances every row by one codec frame;
4. the frames and end-of-speech flags of the step are copied to the host (non-blocking into pinned
   memory on CUDA) and read one step later, so the GPU never waits for the host;
5. chunks that are due are decoded (with left context) and handed to their requests.

A request's audio arrives as float32 chunks through its `RequestHandle` (request_handle.py), iterable
from a thread or an event loop. A whole-file request is the same stream with large chunks, drained by
its caller. How streams are cut into chunks: stream_plan.py; what keeps a seed's bytes in company:
invariance_plan.py.
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
import logging
import secrets
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from tts_service import frame_step as fs
from tts_service import fused_kernels
from tts_service.chunk_decoder import STREAM, WHOLE_FILE, ChunkDecoder, Ending, Window
from tts_service.invariance_plan import InvariancePlan
from tts_service.kv_memory import KV_MEMORY, KVMemory
from tts_service.prompt import PromptBuilder
from tts_service.request_handle import Job, RequestEnd, RequestHandle
from tts_service.sampling import SamplerPlan, SamplingParams
from tts_service.stream_plan import QUICK_START_MAX_STEP_S, WHOLE_FILE_PLAN, ChunkPlan, quick_start_fits, window_lengths
from tts_service.verdict_store import VerdictStore

logger = logging.getLogger(__name__)

SEED_SPACE = 1 << 63  # seeds are non-negative int64
ENGINE_CLOSED = "the engine was shut down"
_SEGMENT_SEED_STRIDE = 0x9E3779B97F4A7C15  # each later segment of a long text draws from its own sequence


# The engine loop's phases, as `StepScheduler.loop_seconds` sums them: cancellations, prefills and
# compaction; launching the frame step (on a CPU: running it); reading a step's frames back (on a GPU:
# the step launched a turn before, so this waits for the GPU); queueing windows to the decoder. The rest
# of the wall time the loop waits for work.
LOOP_PHASES = ("admit", "step", "collect", "hand_off")
# OpenMP teams in a non-main thread are slow; the decoder thread has the other core.
CPU_LOOP_THREADS = 1
# The keys a timed step's rows attend (`time_a_step`, the benchmarks): a short prompt and a few seconds of speech.
TIMED_KEYS = 200


@contextmanager
def rows_at(state: fs.SlotState, keys: int | Sequence[int]) -> Iterator[None]:
    """Every slot as a request with `keys` keys (or slot i with keys[i], from slot 0) while a step is timed
    on free slots, which sit at position 0, where an attention over live keys would read one; their
    positions are restored after."""
    positions = state.position.clone()
    counts = [keys] * state.slots if isinstance(keys, int) else keys
    at = [min(k, state.max_len) - 1 for k in counts]
    state.position[: len(at)] = torch.tensor(at, dtype=positions.dtype, device=positions.device)
    try:
        yield
    finally:
        state.position.copy_(positions)


_OPEN: weakref.WeakSet[StepScheduler] = weakref.WeakSet()


@atexit.register
def _close_open_schedulers() -> None:
    """Close every scheduler before the interpreter finalizes (atexit runs while daemon threads still run):
    a script or test process that ends with an engine mid-step would otherwise abort (`StepScheduler.close`)."""
    for scheduler in list(_OPEN):
        scheduler.close(timeout_s=5.0)


@dataclass(eq=False)  # rows are compared and hashed by identity
class _Row:
    """A request while it holds a slot (or waits to prefill its next segment into one)."""

    job: Job
    handle: RequestHandle
    plan: ChunkPlan | None = None  # the job's, or its quick-start variant (set at admission)
    slot: int = -1
    segment: int = 0
    segment_frames: int = 0
    prompt_len: int = 0  # of the current segment
    samples: bool = False  # draws at random (else greedy throughout)
    decoder_state: Any = None  # a stateful stream's decoder history (streaming_decoder.DecoderState)
    slots_used: list[int] = field(default_factory=list)
    launched: int = 0  # steps launched for the current segment
    codes: list[np.ndarray] = field(default_factory=list)  # every accepted frame, all segments
    lead_in: np.ndarray | None = None  # frames before codes[0] that only condition the decoder [C, 16]
    decoded: int = 0
    truncated: bool = False
    segment_done: bool = False
    finished: bool = False  # no more frames will come
    retired: bool = False  # slot given back, end sent (or queued behind its last audio)
    steps: int = 0
    shared_steps: int = 0
    max_batch: int = 0
    kv_claimed: int = 0  # bytes of CPU KV memory claimed while it holds its slot (kv_memory.py)
    waited_for_memory: bool = False
    prompt: torch.Tensor | None = None  # its next segment's, from when it is built until its prefill

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = self.job.plan


@dataclass
class _Launch:
    """A step in flight: which row sat in which slot, and where its outputs land on the host."""

    rows: list[tuple[_Row, int, int]]  # (row, slot, segment)
    frames: Any  # host tensor [n, 16] (pinned on CUDA)
    done: Any  # host tensor [n]
    event: Any  # CUDA event recorded after the copy, or None


class StepScheduler:
    """Owns the KV slots and the loop; thread-safe `submit` and `cancel`."""

    def __init__(
        self,
        wrapper: Any,
        *,
        slots: int,
        max_len: int,
        sampling: dict[str, Any],
        decode_batching: bool | None = None,
        stream_plan: ChunkPlan | None = None,
        cuda_graphs: bool = True,
        batch_invariant: bool | None = None,
        invariance: InvariancePlan | None = None,
        stateful_streams: bool | None = None,
        compile_step: bool = False,
        decoder_process: bool | None = None,
        quick_start: bool | None = None,
        prefill_graphs: bool = True,
        fewer_kernels: bool | None = None,
        decode_attention: Literal["triton", "sdpa"] = "triton",
        verdicts: VerdictStore | None = None,
        kv_memory_bytes: int | None = None,
    ) -> None:
        self.wrapper = wrapper
        self.model = wrapper.model
        self.samples_per_frame = int(self.model.speech_tokenizer.get_decode_upsample_rate())
        self.sample_rate = int(self.model.speech_tokenizer.get_output_sample_rate())
        self.prompts = PromptBuilder(wrapper)
        self.sampling = dict(sampling)
        self.stream_plan = stream_plan or ChunkPlan()
        self.device = self.model.talker.codec_head.weight.device
        self.on_cuda = self.device.type == "cuda"
        # Streams decoded with carried state (exact, no re-decoded context) or as windows with left
        # context (batched across streams and graph-captured on a GPU, where it is the measured path).
        self.stateful_streams = (not self.on_cuda) if stateful_streams is None else stateful_streams
        speech_decoder = self.model.speech_tokenizer.model.decoder
        worker = None
        if not self.on_cuda if decoder_process is None else decoder_process:
            from tts_service.decoder_process import decoder_process_for  # CPU only: TTSEngine refuses it on CUDA

            # A new child starts loading now, beside the rest of start-up (the invariance checks included)
            worker = decoder_process_for(speech_decoder)
        if invariance is None:  # batch_invariant None: on the CPU, where it is measured to hold
            invariant = not self.on_cuda if batch_invariant is None else batch_invariant
            shapes = fs.product_shapes(self.model) if invariant and not self.on_cuda else None  # (what is checked)
            invariance = InvariancePlan.choose(
                invariant,
                self.on_cuda,
                slots,
                self.stateful_streams,
                shapes,
                self.model.talker.codec_head.weight.dtype,
                speech_decoder,
                CPU_LOOP_THREADS,
                verdicts,
            )
        self.invariance = invariance
        # A stream's first chunk size depends on the load at its start, and chunk boundaries change a
        # stream's last bits: with batch invariance (seeds replay byte for byte) the plan is fixed.
        invariant = invariance != InvariancePlan()
        if quick_start and invariant:
            logger.warning("TTS_STREAM_QUICK_START is ignored: batch invariance fixes every stream's chunk plan")
        self.quick_start = (not invariant) if quick_start is None else quick_start and not invariant
        self.quick_plan = self.stream_plan.quick()
        if decode_batching is None:
            decode_batching = self.on_cuda and not invariance.decode_alone
        self.decode_batching = decode_batching
        # Whole files: with a stateful decoder, decoded as they are generated (so only the last piece is
        # left at the end); else in qwen-tts's own 300-frame windows with 25 frames of context.
        self.file_plan = ChunkPlan(64, 64, 0, streamed=False) if self.stateful_streams else WHOLE_FILE_PLAN
        self.decoder = ChunkDecoder(
            speech_decoder,
            self.samples_per_frame,
            self.device,
            True,
            worker,
            batched=not invariance.decode_alone,
            batch_min_frames=invariance.stateful_batch_min_frames,
        )
        self.decoder.on_error = self._decode_failed
        if self.on_cuda and cuda_graphs:  # a stream's windows, from its first to its steady one
            plans = (self.stream_plan, self.quick_plan) if self.quick_start else (self.stream_plan,)
            self.decoder.capture(window_lengths(plans))
        self.max_len = max_len
        dtype = self.model.talker.codec_head.weight.dtype
        fewer = fs.fewer_kernels_for(self.device, dtype) if fewer_kernels is None else fewer_kernels
        self.weights = fs.build_weights(
            self.model, max_len, self.prompts.pad_embed(), invariance.min_rows, invariance.contiguous_weights, fewer
        )
        # Triton's kernels on a GPU with the fewer forms, unless Inductor compiles the step (it fuses its own)
        if fewer and self.on_cuda and not compile_step:
            self._use_triton_kernels(decode_attention == "triton")
        self.weights.sampler = SamplerPlan.of(self.sampling_params(0))
        self.state = fs.allocate_state(self.weights, slots, max_len)
        # On the CPU a request claims its KV's memory as it joins (kv_memory.py); a GPU's is allocated whole.
        self.kv_memory: KVMemory | None = None
        if not self.on_cuda:
            self.kv_memory = KV_MEMORY
            full = slots * fs.kv_bytes_per_slot(self.weights, max_len)
            self.kv_memory.set_limit(kv_memory_bytes, full, slots, max_len)
        self.step_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
        self.step_fn = fs.frame_step
        self.prefill_fn: Callable[..., None] = fs.prefill
        if compile_step:  # every request shares the service's sampling settings, so one mode is warmed
            from tts_service.step_compiler import compiled_step

            params = self.sampling_params(0)
            sample = params.do_sample or params.sub_do_sample  # as each row's `samples` is set in _admit
            self.step_fn = compiled_step(
                self.weights, self.state, sample, None if self.on_cuda else CPU_LOOP_THREADS, invariance.min_window
            )
        if self.on_cuda and cuda_graphs:
            self._capture_graphs(prefill_graphs)
        logger.info(
            "step engine: %d KV slots of %d positions (%.1f MB each) on %s; batch invariance: %s; kernels: %s",
            slots,
            max_len,
            fs.kv_bytes_per_slot(self.weights, max_len) / 1e6,
            self.device,
            invariance if invariance != InvariancePlan() else "off",
            fs.kernel_forms(self.weights),
        )
        self._free = list(range(slots))  # a heap: the lowest free slot first keeps the window short
        self._pending: deque[_Row] = deque()
        self._rows: list[_Row] = []  # holding slots, or waiting for their next segment's prefill
        self._handles: dict[str, RequestHandle] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False  # set by `close`: the loop ends, and requests are refused
        _OPEN.add(self)
        self._in_flight: _Launch | None = None
        self._host_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffer_turn = 0
        self.step_batch_sizes: deque[int] = deque(maxlen=1000)  # recent step batch sizes, for tests
        self.step_windows: deque[int] = deque(maxlen=1000)  # recent highest occupied slot + 1, for tests
        self.moves = 0  # rows moved down by compaction
        self.on_step: Callable[[int], None] | None = None  # e.g. a metrics histogram
        self.on_admit: Callable[[float], None] | None = None  # a request's seconds from submit to its prefill
        # Where the loop's time goes, summed (seconds): benchmarks read and reset it (bench_engine.py).
        self.loop_seconds: dict[str, float] = dict.fromkeys(LOOP_PHASES, 0.0)
        # Seconds between consecutive steps while the loop is busy (a quick start needs them short); the
        # first from a timed step now, so that the first request is judged too.
        self.step_intervals: deque[float] = deque(maxlen=8)
        self._last_launch: float | None = None
        if self.quick_start:
            self.step_intervals.append(self.time_a_step())
            logger.info(
                "quick start (TTS_STREAM_QUICK_START): on; a lone step takes %.1f ms (a quick start needs %.1f)",
                self.step_intervals[-1] * 1000,
                QUICK_START_MAX_STEP_S * 1000,
            )

    def _use_triton_kernels(self, attention: bool) -> None:
        """The step's Triton kernels where they pass their start-up checks on this device, and with them the
        decode attention over live keys where `attention` asks for it and it passes its own check (else
        SDPA attends, the layer kernels kept)."""
        w = self.weights
        layers, attention = fused_kernels.usable_forms(
            self.device, w.codec_head.dtype, fs.sizes(w), fs.vocabularies(w), self.max_len, attention
        )
        if layers:
            self.weights = fs.with_fewer_kernels(w, True, triton=True, triton_attention=attention)

    def _capture_graphs(self, prefill_graphs: bool) -> None:
        """The step (and the prefill) as CUDA graphs. Triton's kernels passed `fused_kernels.usable` eagerly;
        should capturing them fail all the same (a driver or Triton version that cannot), the step is
        captured again without them rather than the service failing to start."""
        from tts_service.cuda_graphs import GraphedFrameStep, GraphedPrefill

        try:
            graphed = GraphedFrameStep(self.weights, self.state, step=self.step_fn)
            graphed.capture_all()
            if prefill_graphs:
                prefill = GraphedPrefill(self.weights, self.state, pool=graphed.pool)
                prefill.capture_all(self.sampling_params(0))
                self.prefill_fn = prefill
        except Exception:
            if not (self.weights.talker.triton_kernels or self.weights.triton_sampling):
                raise
            logger.exception("capturing the frame step with its Triton kernels failed: capturing it without them")
            self.weights = fs.with_fewer_kernels(self.weights, True, triton=False)
            self.prefill_fn = fs.prefill
            self._capture_graphs(prefill_graphs)
            return
        self.step_fn = graphed

    def time_a_step(self) -> float:
        """Seconds of one step at the narrowest window, on free slots (as graph capture runs them; a
        prefill resets a slot's state), each as a request with TIMED_KEYS keys: a free slot sits at position 0
        (`fs.release`), where an attention over live keys would read one."""
        window = max(1, self.invariance.min_window)
        keys = min(TIMED_KEYS, self.max_len)
        kv_len = min(self.max_len, -(-keys // 32) * 32)  # as `_launch` rounds it
        params = self.sampling_params(0)
        sample = params.do_sample or params.sub_do_sample  # the service's mode, as _admit sets each row's
        threads = torch.get_num_threads()
        if not self.on_cuda:  # on the loop's thread count, as the loop will step
            torch.set_num_threads(CPU_LOOP_THREADS)
        try:
            with torch.inference_mode(), rows_at(self.state, keys):
                self.step_fn(self.weights, self.state, window, kv_len, sample)  # warm
                if self.on_cuda:
                    torch.cuda.synchronize(self.device)
                started = time.perf_counter()
                for _ in range(3):
                    frames, _done = self.step_fn(self.weights, self.state, window, kv_len, sample)
                frames.cpu()
        finally:
            torch.set_num_threads(threads)
        return (time.perf_counter() - started) / 3

    # ---- public ----------------------------------------------------------------------------------
    def reset_time_accounting(self) -> None:
        """Zero `loop_seconds` and the decoder's `busy_seconds`, for a benchmark run to read afresh."""
        self.loop_seconds.update(dict.fromkeys(self.loop_seconds, 0.0))
        self.decoder.busy_seconds = 0.0

    @property
    def slots(self) -> int:
        return self.state.slots

    def submit(self, job: Job, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        handle = RequestHandle(request_id, loop)
        with self._wake:
            if self._closed:
                handle.deliver_end(RequestEnd(0, False, 0, 0, 0, error=ENGINE_CLOSED))
                return handle
            self._handles[request_id] = handle
            self._pending.append(_Row(job=job, handle=handle, lead_in=self._lead_in(job)))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tts-step-engine", daemon=True)
                self._thread.start()
            self._wake.notify()
        return handle

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop the loop and the decoder thread; requests queued or running end with `ENGINE_CLOSED`, and
        later ones are refused with it. Their threads are joined, not left to die with the process: at exit
        Python ends a daemon thread that is inside a torch call with pthread_exit, and that aborts the whole
        process ("terminate called without an active exception"). False if a thread outlived `timeout_s`."""
        started = time.monotonic()
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        if thread is None or not thread.is_alive():
            self._end_all(ENGINE_CLOSED)  # a loop that never started leaves nothing; one that ended, nothing
        decoder_done = self.decoder.close(max(0.0, timeout_s - (time.monotonic() - started)))
        return decoder_done and (thread is None or not thread.is_alive())

    def cancel(self, request_id: str) -> bool:
        """Cancel a request by its id (e.g. its client hung up); False if it is not running."""
        handle = self._handles.get(request_id)
        if handle is None:
            return False
        handle.cancel()
        with self._wake:
            self._wake.notify()
        return True

    @property
    def active(self) -> int:
        return len(self._rows) + len(self._pending)

    def sampling_params(self, seed: int, segment: int = 0) -> SamplingParams:
        s = self.sampling
        return SamplingParams(
            do_sample=bool(s["do_sample"]),
            temperature=float(s["temperature"]),
            top_k=int(s["top_k"] or 0),
            top_p=float(s["top_p"]),
            repetition_penalty=float(s["repetition_penalty"] or 1.0),
            sub_do_sample=bool(s["subtalker_dosample"]),
            sub_temperature=float(s["subtalker_temperature"]),
            sub_top_k=int(s["subtalker_top_k"] or 0),
            sub_top_p=float(s["subtalker_top_p"]),
            seed=(seed + segment * _SEGMENT_SEED_STRIDE) % SEED_SPACE,
        )

    @staticmethod
    def new_seed() -> int:
        return secrets.randbits(63)

    # ---- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        if not self.on_cuda:
            torch.set_num_threads(CPU_LOOP_THREADS)
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._rows and self._in_flight is None:
                    self._wake.wait()
                if self._closed:
                    break
            try:
                with torch.inference_mode():
                    self._turn()
            except Exception as exc:  # a failing step ends the requests in it, never the thread
                logger.exception("engine step failed; ending %d requests", len(self._rows))
                self._fail_all(f"{type(exc).__name__}: {exc}")
            if self._pending and not self._rows and self._in_flight is None:
                with self._wake:  # the queue waits for KV memory that another engine of the process holds
                    self._wake.wait(0.05)
        self._end_all(ENGINE_CLOSED)

    def _turn(self) -> None:
        clock = time.perf_counter
        started = clock()
        self._drop_cancelled()
        self._admit()
        self._compact()
        admitted = clock()
        launch = self._launch() if any(row.slot >= 0 and not row.segment_done for row in self._rows) else None
        launched = clock()
        if launch is not None and self._last_launch is not None:
            self.step_intervals.append(launched - self._last_launch)
        self._last_launch = launched if launch is not None else None  # an idle turn breaks the chain
        if self.on_cuda:  # read the previous step while this one runs
            previous, self._in_flight = self._in_flight, launch
            if previous is not None:
                self._collect(previous)
        elif launch is not None:
            self._collect(launch)
        collected = clock()
        self._hand_off()
        spent = self.loop_seconds
        spent["admit"] += admitted - started
        spent["step"] += launched - admitted
        spent["collect"] += collected - launched
        spent["hand_off"] += clock() - collected

    # ---- admission -------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill, as one batch, the rows starting a segment: continuing rows first, then new requests, in
        their order, while a slot is free and (on the CPU) their KV fits the memory left (`_claim`)."""
        joining = [row for row in self._rows if row.segment_done and not row.finished and row.slot >= 0]
        ready = []
        for row in joining:  # they hold their slots: their claims grow if need be, they never wait
            try:
                row.prompt = self._prompt(row)
                self._cover(row, self._kv_need(row, row.prompt))
                ready.append(row)
            except Exception as exc:  # this request's prompt cannot be built: it fails alone
                logger.exception("request %s: could not build its prompt", row.handle.request_id)
                self._end(row, error=f"{type(exc).__name__}: {exc}")
        while self._free:
            with self._wake:  # only this thread takes rows off the queue; `submit` appends under the lock
                row = self._pending[0] if self._pending else None
            if row is None:
                break
            if row.handle.cancelled.is_set():
                self._take_pending(row)
                self._end(row, cancelled=True)
                continue
            try:
                if row.prompt is None:  # (kept from an earlier try if it waited for KV memory)
                    row.prompt = self._prompt(row)
            except Exception as exc:
                self._take_pending(row)
                logger.exception("request %s: could not build its prompt", row.handle.request_id)
                self._end(row, error=f"{type(exc).__name__}: {exc}")
                continue
            if not self._claim(row, self._kv_need(row, row.prompt)):
                break  # it waits, and every request behind it, until KV memory is given back
            self._take_pending(row)
            row.slot = heapq.heappop(self._free)
            self._rows.append(row)
            ready.append(row)
        prompts = [row.prompt for row in ready]
        for row in ready:
            row.prompt = None
        params = [self.sampling_params(row.job.seed, row.segment) for row in ready]
        if not ready:
            return
        if self.quick_start:
            for row in ready:
                if row.segment == 0 and row.plan.streamed and self._quick_start_fits(row):
                    row.plan = row.plan.quick()
        groups = [[i] for i in range(len(ready))] if self.invariance.prefill_alone else [list(range(len(ready)))]
        for group in groups:  # a batched prefill writes every row's keys up to the longest prompt's length
            longest = max(int(prompts[i].shape[0]) for i in group)
            for i in group:
                self._cover(ready[i], self._kv_bytes(longest))
        prefilled = []
        for group in groups:
            try:
                self.prefill_fn(
                    self.weights,
                    self.state,
                    [ready[i].slot for i in group],
                    [prompts[i] for i in group],
                    [params[i] for i in group],
                )
            except Exception as exc:
                logger.exception("prefill failed for %d requests", len(group))
                for i in group:
                    self._end(ready[i], error=f"{type(exc).__name__}: {exc}")
                continue
            prefilled += group
        admitted = time.perf_counter()
        for row, prompt, param in ((ready[i], prompts[i], params[i]) for i in prefilled):
            if row.segment == 0:
                row.handle.timeline["prefilled"] = admitted
                if self.on_admit is not None:
                    self.on_admit(admitted - row.handle.timeline["submitted"])
            row.segment_done, row.segment_frames, row.launched = False, 0, 0
            row.slots_used.append(row.slot)
            row.prompt_len = int(prompt.shape[0])
            row.samples = param.do_sample or param.sub_do_sample

    def _take_pending(self, row: _Row) -> None:
        with self._wake:
            self._pending.remove(row)

    def _prompt(self, row: _Row) -> torch.Tensor:
        """The prompt of the row's current segment; it fails alone (not its prefill batch) if it cannot fit."""
        job = row.job
        prompt = self.prompts.build(job.segments[row.segment], job.speaker, job.language, job.instruct, job.voice)
        room = self.max_len - job.budgets[row.segment] - 2
        if prompt.shape[0] > room:
            raise ValueError(
                f"the prompt has {prompt.shape[0]} tokens; a KV slot has room for {room} beside this "
                "segment's frames (raise TTS_MAX_PROMPT_TOKENS)"
            )
        return prompt

    def _kv_need(self, row: _Row, prompt: torch.Tensor) -> int:
        """The KV memory the row's segment may write: its prompt and its frame budget."""
        return self._kv_bytes(int(prompt.shape[0]) + row.job.budgets[row.segment] + 1)

    def _kv_bytes(self, positions: int) -> int:
        """What a slot's first `positions` positions hold on the CPU (0 on a GPU: its KV is allocated whole)."""
        return 0 if self.kv_memory is None else fs.kv_pages_bytes(self.weights, min(self.max_len, positions))

    def _cover(self, row: _Row, need: int) -> None:
        """A row that holds its slot claims `need` without waiting, if that is more than it has claimed (what
        its slot held stays there until it leaves): its next segment, a batched prefill's padding."""
        if self.kv_memory is not None and need > row.kv_claimed:
            self.kv_memory.resize(row.kv_claimed, need)
            row.kv_claimed = need

    def _claim(self, row: _Row, need: int) -> bool:
        if self.kv_memory is None:
            return True
        if not self.kv_memory.claim(need):
            if not row.waited_for_memory:
                row.waited_for_memory = True
                logger.info(
                    "request %s waits for KV memory: it needs %.0f MB, and %.0f of %.0f MB are claimed",
                    row.handle.request_id,
                    need / 1e6,
                    self.kv_memory.claimed / 1e6,
                    self.kv_memory.limit / 1e6,
                )
            return False
        row.kv_claimed = need
        return True

    def _quick_start_fits(self, row: _Row) -> bool:
        """`quick_start_fits` for `row` now: the other streams' audio in hand, the recent steps' pace."""
        now = time.perf_counter()
        others = [
            other
            for other in self._rows
            if other is not row and other.plan.streamed and not other.retired and not other.handle.cancelled.is_set()
        ]
        in_hand = [
            self._deadline(other, now) - now if "first_audio" in other.handle.timeline else None for other in others
        ]
        # the median: one slow turn (a long admission, a pause of the process) says little of the pace
        interval = statistics.median(self.step_intervals) if self.step_intervals else None
        return quick_start_fits(in_hand, interval, bool(self._pending))

    def _compact(self) -> None:
        """Keep the step window short: while a slot below the highest occupied one is free (requests left
        and none is waiting to take it), move the top row down into it. A step computes rows [:n], n = the
        highest slot + 1, so without this one long request in a high slot keeps a burst's full width
        stepping after the others have ended. A move copies only that row's own K/V (see `fs.move`)."""
        while self._free:
            holding = [row for row in self._rows if row.slot >= 0]
            if not holding:
                return
            top = max(holding, key=lambda row: row.slot)
            if self._free[0] > top.slot or top.segment_done:
                return
            hole = heapq.heapreplace(self._free, top.slot)
            # positions written so far: the prompt, plus one per launched step (the one in flight too)
            fs.move(self.state, top.slot, hole, min(self.max_len, top.prompt_len + top.launched))
            top.slot = hole
            self.moves += 1

    # ---- one step --------------------------------------------------------------------------------
    def _launch(self) -> _Launch:
        stepping = [row for row in self._rows if row.slot >= 0 and not row.segment_done]
        n = max(row.slot for row in stepping) + 1
        window = max(n, self.invariance.min_window)  # rows past n are free slots, computed harmlessly
        # Every stepping row's next write position is prompt + steps launched; keys up to it are read.
        furthest = max(row.prompt_len + row.launched for row in stepping)
        kv_len = min(self.max_len, -(-(furthest + 1) // 32) * 32)
        sample = any(row.samples for row in stepping)
        frames, done = self.step_fn(self.weights, self.state, window, kv_len, sample)
        batch = len(stepping)
        for row in stepping:
            row.launched += 1
            row.steps += 1
            row.shared_steps += batch > 1
            row.max_batch = max(row.max_batch, batch)
        self.step_batch_sizes.append(batch)
        self.step_windows.append(n)
        if self.on_step is not None:
            self.on_step(batch)
        placed = [(row, row.slot, row.segment) for row in stepping]
        if not self.on_cuda:
            return _Launch(placed, frames, done, None)
        host_frames, host_done = self._host_buffer()
        host_frames[:window].copy_(frames, non_blocking=True)
        host_done[:window].copy_(done, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Launch(placed, host_frames, host_done, event)

    def _host_buffer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two pinned buffer pairs, alternating: one is being filled while the other is read."""
        if not self._host_buffers:
            for _ in range(2):
                self._host_buffers.append(
                    (
                        torch.empty(self.slots, fs.NUM_CODE_GROUPS, dtype=torch.long, pin_memory=True),
                        torch.empty(self.slots, dtype=torch.bool, pin_memory=True),
                    )
                )
        self._buffer_turn ^= 1
        return self._host_buffers[self._buffer_turn]

    def _collect(self, launch: _Launch) -> None:
        """Accept a finished step's frames for the rows that were in it and are still going."""
        if launch.event is not None:
            launch.event.synchronize()
        frames = launch.frames.numpy()
        done = launch.done.numpy()
        for row, slot, segment in launch.rows:
            if row.finished or row.segment_done or row.segment != segment or row.handle.end is not None:
                continue  # the step ran on for a row (or segment) that had already ended: dropped
            row.codes.append(frames[slot].copy())
            if len(row.codes) == 1:
                row.handle.timeline["first_frame"] = time.perf_counter()
            row.segment_frames += 1
            if bool(done[slot]):
                self._segment_ended(row, truncated=False)
            elif row.segment_frames >= row.job.budgets[row.segment]:
                self._segment_ended(row, truncated=True)

    def _segment_ended(self, row: _Row, truncated: bool) -> None:
        row.truncated |= truncated
        row.segment_done = True
        if row.segment + 1 < len(row.job.segments):
            row.segment += 1  # prefilled into the same slot at the next admission
        else:
            row.finished = True

    # ---- audio out -------------------------------------------------------------------------------
    def _windows_due(self, now: float) -> list[Window]:
        """Windows to decode now: rows with a chunk due, plus (when decoding in batches) other streams
        with at least half a chunk waiting, so that streams fall into step and share decoder calls.
        A stream's window carries its deadline (`_deadline`)."""
        due: list[_Row] = []
        for row in self._rows:
            if row.retired or row.handle.cancelled.is_set() or len(row.codes) <= row.decoded:
                continue
            if row.finished or len(row.codes) - row.decoded >= row.plan.target(row.decoded):
                due.append(row)
        if due and self.decode_batching:
            for row in self._rows:
                plan = row.plan
                waiting = len(row.codes) - row.decoded
                if row not in due and plan.streamed and row.decoded > 0 and 2 * waiting >= plan.frames:
                    due.append(row)
        for row in due:
            if row.decoded == 0:
                row.handle.timeline.setdefault("first_window", now)
        windows = []
        stateful = due if self.stateful_streams else []  # then every request, stream or file, carries state
        for row in stateful:
            if row.decoder_state is None:
                row.decoder_state = self.decoder.new_state()
            end = self._window_end(row)
            codes, context = np.stack(row.codes[row.decoded : end]), 0
            if row.decoded == 0 and row.lead_in is not None:  # the state starts from the whole reference
                codes, context = np.concatenate([row.lead_in, codes]), len(row.lead_in)
            windows.append(Window(row.handle, codes, context, row.decoder_state, self._deadline(row, now)))
            row.decoded = end
        due = [row for row in due if row not in stateful]
        lengths = {row: self._window_end(row) - row.decoded + row.plan.left_context for row in due}
        longest = max((lengths[row] for row in due if row.plan.streamed), default=0)
        for row in due:
            end = self._window_end(row)
            length = lengths[row]
            if self.decode_batching and row.plan.streamed:
                length = longest  # more left context, same window length: one decoder call for all
            lead = 0 if row.lead_in is None else len(row.lead_in)  # context reaches back into the reference
            start = max(-lead, end - length)
            codes = np.stack(row.codes[max(0, start) : end])
            if start < 0:
                codes = np.concatenate([row.lead_in[start:], codes])
            windows.append(Window(row.handle, codes, row.decoded - start, None, self._deadline(row, now)))
            row.decoded = end
        return windows

    @staticmethod
    def _lead_in(job: Job) -> np.ndarray | None:
        """A cloned voice's reference frames (ICL mode), which lead into its first frames as decoder
        context, as qwen-tts decodes the reference and the new frames together and cuts the reference's
        audio off. A stateful decoder starts from all of them (its audio then equals qwen-tts's); windows
        take as many as their left context."""
        if job.voice is None or job.voice.ref_codes is None:
            return None
        return job.voice.ref_codes.cpu().numpy().astype(np.int64)

    @staticmethod
    def _window_end(row: _Row) -> int:
        if row.finished:
            return len(row.codes)
        return min(len(row.codes), row.decoded + max(row.plan.target(row.decoded), len(row.codes) - row.decoded))

    def _hand_off(self) -> None:
        """Queue due windows, then the ends of requests whose last frame is queued; free their slots.
        Streams' items go before whole files', each stream's by the time its listener would run out of
        audio (see `_deadline` and chunk_decoder)."""
        now = time.perf_counter()
        items: list[Window | Ending] = list(self._windows_due(now))
        for row in self._rows:
            if row.finished and not row.retired and row.decoded >= len(row.codes):
                end = self._retire(row)
                ending = Ending(row.handle, lambda row=row, end=end: self._deliver(row, end))
                ending.deadline = self._deadline(row, now)  # row.decoded is every frame by now
                items.append(ending)
        streams = {row.handle for row in self._rows if row.plan.streamed}
        self.decoder.put([item for item in items if item.handle in streams], STREAM)
        self.decoder.put([item for item in items if item.handle not in streams], WHOLE_FILE)
        self._rows = [row for row in self._rows if not row.retired]

    def _deadline(self, row: _Row, now: float) -> float:
        """When a stream's listener, playing from its first chunk, would have heard the `row.decoded` frames
        sent before this item: the item is needed by then. Before its first audio the listener starts no
        sooner than now, so a first window's deadline is the moment it is due, and a stream that is already
        late goes before it. Whole files have none (0). (The decoder's queue keeps each request's items in
        order whatever their deadlines.)"""
        if not row.plan.streamed:
            return 0.0
        started = row.handle.timeline.get("first_audio", now)
        return started + row.decoded * self.samples_per_frame / self.sample_rate

    def _retire(self, row: _Row, error: str | None = None, cancelled: bool = False) -> RequestEnd:
        """Give the slot back and say how the request ended (not yet delivered)."""
        if row.slot >= 0:
            fs.release(self.state, row.slot)
            heapq.heappush(self._free, row.slot)
            row.slot = -1
        if self.kv_memory is not None:
            self.kv_memory.give_back(row.kv_claimed)
        row.kv_claimed = 0
        row.finished = row.retired = True
        self._handles.pop(row.handle.request_id, None)
        return RequestEnd(
            frames=row.decoded,
            truncated=row.truncated,
            steps=row.steps,
            shared_steps=row.shared_steps,
            max_batch=row.max_batch,
            segments=len(row.job.segments),
            error=error,
            cancelled=cancelled or row.handle.cancelled.is_set(),
            codes=np.stack(row.codes) if row.codes else np.zeros((0, fs.NUM_CODE_GROUPS), dtype=np.int64),
            slots=tuple(row.slots_used),
        )

    def _deliver(self, row: _Row, end: RequestEnd) -> None:
        """Hand the request its end and log one line (any thread)."""
        if not row.handle.deliver_end(end):
            return
        outcome = "cancelled" if end.cancelled else ("failed" if end.error else "done")
        timeline = row.handle.timeline
        first = timeline.get("first_audio")
        logger.info(
            "request %s (%s) %s: %d frames in %.2f s (first audio after %s), %d segments, %d decode steps, "
            "%d of them shared (batch up to %d)",
            row.handle.request_id,
            "whole file" if not row.plan.streamed else "stream, quick start" if row.plan != row.job.plan else "stream",
            outcome,
            end.frames,
            time.perf_counter() - timeline["submitted"],
            "none" if first is None else f"{1000 * (first - timeline['submitted']):.0f} ms",
            end.segments,
            end.steps,
            end.shared_steps,
            end.max_batch,
        )

    def _end(self, row: _Row, error: str | None = None, cancelled: bool = False) -> None:
        """End a request now (failed or cancelled): no more audio is owed to it."""
        if row.retired:
            return
        self._deliver(row, self._retire(row, error, cancelled))

    def _decode_failed(self, handle: RequestHandle, error: str) -> None:
        """The decoder could not turn a request's frames into audio: it fails; the engine drops its row."""
        handle.deliver_end(RequestEnd(0, False, 0, 0, 0, error=error))
        handle.cancel()

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.handle.cancelled.is_set():
                self._end(row, cancelled=True)
        self._rows = [row for row in self._rows if not row.retired]
        with self._wake:
            waiting = [row for row in self._pending if row.handle.cancelled.is_set()]
            for row in waiting:
                self._pending.remove(row)
        for row in waiting:
            self._end(row, cancelled=True)

    def _end_all(self, error: str) -> None:
        """On close: end every running and queued request."""
        self._fail_all(error)
        with self._wake:
            waiting, self._pending = list(self._pending), deque()
        for row in waiting:
            self._end(row, error=error)

    def _fail_all(self, error: str) -> None:
        """After a failed step: end every request that was in it and start clean with the rest."""
        self._in_flight = None
        for row in self._rows:
            self._end(row, error=error)
        self._rows = []
