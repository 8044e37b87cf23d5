"""Wave 1's streaming loop, kept only as the benchmark baseline of `bench.py step` ("today's _step").

It advanced streams with qwen-tts's own talker forward (whose code predictor runs HF `generate`) on a
shared `DynamicCache` that is left-padded and concatenated when a stream joins and re-indexed when one
leaves. Serving no longer uses it; see src/tts_service/frame_step.py for what replaced it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tts_service.engine import SynthesisRequest, TTSEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkPlan:
    """Frames per decoded chunk: a small first chunk for a fast start, larger ones for efficiency."""

    first_frames: int = 4
    frames: int = 16
    left_context: int = 25  # qwen-tts's own chunked_decode uses 25

    def target(self, decoded: int) -> int:
        return self.first_frames if decoded == 0 else self.frames


@dataclass(frozen=True)
class StreamEnd:
    """The last item of every stream."""

    frames: int
    truncated: bool
    steps: int  # decode steps this stream took part in
    shared_steps: int  # of those, steps shared with at least one other stream
    max_batch: int
    error: str | None = None
    cancelled: bool = False


class StreamHandle:
    """What `StreamScheduler.submit` returns: iterate it (sync or async) for float32 chunks."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request_id = request_id
        self.cancelled = threading.Event()
        self.end: StreamEnd | None = None
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def _put(self, item: np.ndarray | StreamEnd) -> None:
        if self._loop is not None and self._async_queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone: it is not listening any more
                self.cancelled.set()
        else:
            self._queue.put(item)

    def cancel(self) -> None:
        """Stop generating for this stream; its slot is freed at the next step."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if isinstance(item, StreamEnd):
                self.end = item
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[np.ndarray]:
        assert self._async_queue is not None, "submit(..., loop=...) for async iteration"
        try:
            while True:
                item = await self._async_queue.get()
                if isinstance(item, StreamEnd):
                    self.end = item
                    return
                yield item
        finally:
            if self.end is None:  # the consumer stopped early (client gone): free the slot
                self.cancel()


@dataclass
class _Row:
    """One stream's place in the running batch."""

    handle: StreamHandle
    budget: int
    text_hidden: Any  # [L, H]: the text to add step by step (qwen-tts streams the text in this way)
    started: float
    generated: int = 1  # codec tokens sampled so far (the prefill samples the first)
    steps: int = 0
    shared_steps: int = 0
    max_batch: int = 0
    codes: list = field(default_factory=list)  # per frame: [16] codes on the CPU
    decoded: int = 0  # frames already decoded and sent
    finished: bool = False
    truncated: bool = False


class _PromptCaptured(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs


class StreamScheduler:
    """One background thread that owns every streaming generation on the engine's model."""

    def __init__(self, engine: TTSEngine, plan: ChunkPlan | None = None, max_streams: int = 16) -> None:
        import torch

        self.engine = engine
        self.plan = plan or ChunkPlan()
        self.max_streams = max_streams
        self.torch = torch
        self.wrapper = engine.model  # qwen_tts.Qwen3TTSModel
        self.model = engine.model.model  # Qwen3TTSForConditionalGeneration
        self.talker = self.model.talker
        self.decoder = self.model.speech_tokenizer.model.decoder
        self.eos = int(self.model.config.talker_config.codec_eos_token_id)
        self._pending: deque[tuple[SynthesisRequest, StreamHandle]] = deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._handles: dict[str, StreamHandle] = {}  # by request id, while generating
        self._state: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self.step_batch_sizes: list[int] = []  # the last steps' batch sizes, for tests and metrics
        self.on_step: Any = None  # optional callback(batch_size), e.g. a metrics histogram

    # ---- public ----------------------------------------------------------------------------------
    def submit(
        self, request: SynthesisRequest, request_id: str, loop: asyncio.AbstractEventLoop | None = None
    ) -> StreamHandle:
        handle = StreamHandle(request_id, loop)
        with self._wake:
            self._handles[request_id] = handle
            self._pending.append((request, handle))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tts-stream-scheduler", daemon=True)
                self._thread.start()
            self._wake.notify()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Cancel a stream by its request id (e.g. its client hung up); False if it is not running."""
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

    # ---- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        torch = self.torch
        while True:
            with self._wake:
                while not self._pending and not self._rows:
                    self._wake.wait()
                room = self.max_streams - len(self._rows)
                joining = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            try:
                with torch.inference_mode():
                    if joining:
                        self._admit(joining)
                    if self._rows:
                        self._step()
            except Exception as exc:  # a failure ends the streams it hit, never the thread
                logger.exception("streaming step failed; ending %d streams", len(self._rows) + len(joining))
                for row in self._rows:
                    self._finish(row, error=f"{type(exc).__name__}: {exc}")
                for _, handle in joining:
                    if handle.end is None:
                        handle._put(StreamEnd(0, False, 0, 0, 0, error=f"{type(exc).__name__}: {exc}"))
                self._rows, self._state = [], {}

    # ---- prefill and join ------------------------------------------------------------------------
    def _generation_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.engine.settings.greedy:
            kwargs.update(do_sample=False, subtalker_dosample=False)
        return kwargs

    def _capture_prompt(self, requests: list[SynthesisRequest]) -> dict[str, Any]:
        """qwen-tts's own prompt for these requests: run generate_custom_voice up to the talker's
        generate call and take its arguments (left-padded embeddings, mask, trailing text, sampling)."""

        def capture(**kwargs: Any) -> None:
            raise _PromptCaptured(kwargs)

        self.talker.generate = capture  # instance attribute; only this thread uses the model now
        try:
            self.wrapper.generate_custom_voice(
                text=[r.text for r in requests],
                speaker=[r.speaker for r in requests],
                language=[r.language for r in requests],
                instruct=[r.instruct for r in requests],
                **self._generation_kwargs(),
            )
        except _PromptCaptured as captured:
            return captured.kwargs
        finally:
            del self.talker.generate
        raise RuntimeError("qwen-tts did not reach the talker's generate call")

    def _admit(self, joining: list[tuple[SynthesisRequest, StreamHandle]]) -> None:
        torch = self.torch
        for _, handle in joining:
            if handle.cancelled.is_set():
                handle._put(StreamEnd(0, False, 0, 0, 0, cancelled=True))
                self._handles.pop(handle.request_id, None)
        joining = [(r, h) for r, h in joining if not h.cancelled.is_set()]
        if not joining:
            return
        prompt = self._capture_prompt([r for r, _ in joining])
        self._sampling = {k: prompt[k] for k in ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty")}
        self._subtalker = {k: prompt[k] for k in prompt if k.startswith("subtalker_")}
        self._suppress = torch.tensor(prompt["suppress_tokens"], device=self.talker.device, dtype=torch.long)
        self._pad_embed = prompt["tts_pad_embed"]  # [1, 1, H]
        embeds, mask = prompt["inputs_embeds"], prompt["attention_mask"]
        out = self.talker(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        now = time.perf_counter()
        rows = [
            _Row(
                handle=h,
                budget=self.engine.frame_budget(r.text),
                text_hidden=prompt["trailing_text_hidden"][i],
                started=now,
            )
            for i, (r, h) in enumerate(joining)
        ]
        vocab = out.logits.shape[-1]
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=out.logits.device)
        generated = torch.zeros(len(rows), dtype=torch.long, device=out.logits.device)
        first = self._sample(out.logits[:, -1, :].float(), seen, generated)
        seen[torch.arange(len(rows)), first] = True
        new = {
            "cache": out.past_key_values,
            "mask": mask,
            "last": first.unsqueeze(1),
            "past_hidden": out.past_hidden,
            "seen": seen,
        }
        self._state = self._merge(self._state, new) if self._state else new
        self._rows.extend(rows)

    def _merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """Join two running batches: left-pad the shorter cache and mask, then stack the rows."""
        torch = self.torch
        length = max(a["mask"].shape[1], b["mask"].shape[1])
        for part in (a, b):
            pad = length - part["mask"].shape[1]
            if pad:
                part["mask"] = torch.nn.functional.pad(part["mask"], (pad, 0))
                for layer in part["cache"].layers:
                    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, pad, 0))
                    layer.values = torch.nn.functional.pad(layer.values, (0, 0, pad, 0))
        for layer_a, layer_b in zip(a["cache"].layers, b["cache"].layers, strict=True):
            layer_a.keys = torch.cat([layer_a.keys, layer_b.keys])
            layer_a.values = torch.cat([layer_a.values, layer_b.values])
        return {
            "cache": a["cache"],
            "mask": torch.cat([a["mask"], b["mask"]]),
            "last": torch.cat([a["last"], b["last"]]),
            "past_hidden": torch.cat([a["past_hidden"], b["past_hidden"]]),
            "seen": torch.cat([a["seen"], b["seen"]]),
        }

    # ---- one decode step for every stream --------------------------------------------------------
    def _sample(self, logits: Any, seen: Any, generated: Any) -> Any:
        """The talker's logits processing, per row: repetition penalty over its own codes, no codec
        special tokens, no end-of-speech before the second token, then greedy or top-k/top-p sampling."""
        torch = self.torch
        penalty = float(self._sampling["repetition_penalty"] or 1.0)
        if penalty != 1.0:
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(seen, penalised, logits)
        logits[:, self._suppress] = -float("inf")
        logits[generated < 2, self.eos] = -float("inf")  # qwen-tts passes min_new_tokens=2
        if not self._sampling["do_sample"]:
            return logits.argmax(dim=-1)
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        for warper in (
            TemperatureLogitsWarper(float(self._sampling["temperature"])),
            TopKLogitsWarper(int(self._sampling["top_k"])),
            TopPLogitsWarper(float(self._sampling["top_p"])),
        ):
            logits = warper(None, logits)
        return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)

    def _step(self) -> None:
        torch = self.torch
        state, rows = self._state, self._rows
        device = state["mask"].device
        batch, length = state["mask"].shape
        real = state["mask"].sum(dim=1)
        mask = torch.cat([state["mask"], torch.ones(batch, 1, dtype=state["mask"].dtype, device=device)], dim=1)
        # Each row's next position is its own length, whatever padding the shared cache holds.
        self.talker.rope_deltas = (real - length).unsqueeze(1)
        text = torch.stack(
            [
                row.text_hidden[row.steps] if row.steps < row.text_hidden.shape[0] else self._pad_embed[0, 0]
                for row in rows
            ]
        ).unsqueeze(1)
        out = self.talker(
            input_ids=state["last"],
            attention_mask=mask,
            past_key_values=state["cache"],
            cache_position=torch.tensor([length], device=device),
            use_cache=True,
            past_hidden=state["past_hidden"],
            trailing_text_hidden=text,  # per row, so generation_step 0 picks each row's own step
            tts_pad_embed=self._pad_embed,
            generation_step=0,
            **self._subtalker,
        )
        frames = out.hidden_states[1].cpu()  # [B, 16]: the frame completed by this step
        generated = torch.tensor([row.generated for row in rows], device=device)
        token = self._sample(out.logits[:, -1, :].float(), state["seen"], generated)
        state["seen"][torch.arange(batch, device=device), token] = True
        state.update(mask=mask, last=token.unsqueeze(1), past_hidden=out.past_hidden)
        self.step_batch_sizes = (self.step_batch_sizes + [batch])[-1000:]
        if self.on_step is not None:
            self.on_step(batch)
        tokens = token.tolist()
        for row, frame, next_token in zip(rows, frames, tokens, strict=True):
            row.codes.append(frame)
            row.steps += 1
            row.generated += 1
            row.max_batch = max(row.max_batch, batch)
            row.shared_steps += batch > 1
            if next_token == self.eos:
                row.finished = True
            elif len(row.codes) >= row.budget:
                row.finished, row.truncated = True, True
        self._emit_chunks()
        self._drop_done()

    # ---- audio out -------------------------------------------------------------------------------
    def _emit_chunks(self) -> None:
        torch = self.torch
        plan, spf = self.plan, self.engine.samples_per_frame
        due = [
            row
            for row in self._rows
            if not row.handle.cancelled.is_set()
            and len(row.codes) > row.decoded
            and (row.finished or len(row.codes) - row.decoded >= plan.target(row.decoded))
        ]
        groups: dict[tuple[int, int], list[_Row]] = {}
        for row in due:  # rows whose windows have the same shape are decoded as one batch
            start = max(0, row.decoded - plan.left_context)
            groups.setdefault((row.decoded - start, len(row.codes) - start), []).append(row)
        for (context, window), group in groups.items():
            codes = torch.stack([torch.stack(row.codes[len(row.codes) - window :]) for row in group])  # [b, T, 16]
            codes = codes.transpose(1, 2).to(self.decoder.device).clamp(min=0)
            wavs = self.decoder(codes).squeeze(1).float().cpu().numpy()
            for row, wav in zip(group, wavs, strict=True):
                row.handle._put(np.ascontiguousarray(wav[context * spf : window * spf]))
                row.decoded = len(row.codes)

    def _finish(self, row: _Row, error: str | None = None) -> None:
        cancelled = row.handle.cancelled.is_set()
        end = StreamEnd(
            frames=row.decoded,
            truncated=row.truncated,
            steps=row.steps,
            shared_steps=row.shared_steps,
            max_batch=row.max_batch,
            error=error,
            cancelled=cancelled,
        )
        row.handle._put(end)
        self._handles.pop(row.handle.request_id, None)
        logger.info(
            "stream %s %s: %d frames in %.2f s, %d decode steps, %d of them shared (batch up to %d)",
            row.handle.request_id,
            "cancelled" if cancelled else ("failed" if error else "done"),
            row.decoded,
            time.perf_counter() - row.started,
            row.steps,
            row.shared_steps,
            row.max_batch,
        )

    def _drop_done(self) -> None:
        torch = self.torch
        keep = []
        for index, row in enumerate(self._rows):
            if row.finished or row.handle.cancelled.is_set():
                self._finish(row)
            else:
                keep.append(index)
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._state = {}
            return
        state = self._state
        index = torch.tensor(keep, device=state["mask"].device)
        mask = state["mask"].index_select(0, index)
        # Columns that only ever held the padding of rows now gone are dropped from the cache.
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        state["mask"] = mask[:, start:]
        for layer in state["cache"].layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        for key in ("last", "past_hidden", "seen"):
            state[key] = state[key].index_select(0, index)
