"""The synthesizer service's side of a job: the engine, loaded in the background, serving validated jobs.

The model loads in a thread so that the synthesizer's worker answers `/readyz` (503, then 200) from
the start instead of leaving probes unanswered while a 4 GB checkpoint loads. A model that cannot load
stops the whole server with one message (startup.abort_serving).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import numpy as np

from tts_service.audio import encode
from tts_service.engine import ModelLoadError, SynthesisError, TTSEngine
from tts_service.metrics import step_batch_size
from tts_service.scheduler import RequestHandle
from tts_service.schemas import ModelInfo, SynthesisJob, SynthesisOutcome
from tts_service.settings import Settings
from tts_service.startup import abort_serving

logger = logging.getLogger(__name__)


class EngineHost:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: TTSEngine | None = None
        self._loaded = threading.Event()
        threading.Thread(target=self._load, name="model-load", daemon=True).start()

    def _load(self) -> None:
        try:
            engine = TTSEngine.load(self.settings)
        except ModelLoadError as exc:
            abort_serving(str(exc))  # does not return
        except BaseException:
            logger.exception("loading the model failed")
            abort_serving("loading the model failed (traceback above)")
        engine.scheduler.on_step = step_batch_size().observe
        self._engine = engine
        self._loaded.set()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set()

    async def engine(self) -> TTSEngine:
        """The engine; calls that arrive while the model loads wait for it, as they would for a slow start."""
        if not self._loaded.is_set():
            await asyncio.to_thread(self._loaded.wait)
        assert self._engine is not None
        return self._engine

    async def _submit(self, job: SynthesisJob, stream: bool) -> tuple[TTSEngine, RequestHandle]:
        """The front validated the job against this model: a refusal here is our failure, not the client's."""
        engine = await self.engine()
        request = engine.request_for(job.text, job.speaker, job.language, job.instruct, job.seed)
        return engine, engine.submit(request, job.request_id, asyncio.get_running_loop(), stream=stream)

    async def model_info(self) -> ModelInfo:
        return (await self.engine()).describe()

    async def cancel(self, request_id: str) -> bool:
        return (await self.engine()).cancel(request_id)

    async def synthesize_file(self, job: SynthesisJob) -> SynthesisOutcome:
        """A whole job as 16-bit PCM: the same engine stream as /v1/tts/stream, drained."""
        engine, handle = await self._submit(job, stream=False)
        chunks = [chunk async for chunk in handle]
        end = handle.end
        if end is None or end.error:
            raise SynthesisError(f"request {job.request_id} failed: {end.error if end else 'no end'}")
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return SynthesisOutcome(
            pcm=encode(samples, engine.sample_rate, "pcm"),
            sample_rate=engine.sample_rate,
            num_samples=len(samples),
            frames=end.frames,
            truncated=end.truncated,
            batch_size=end.max_batch,
        )

    async def stream_pcm(self, job: SynthesisJob) -> AsyncIterator[bytes]:
        """16-bit PCM chunks as the engine decodes them."""
        engine, handle = await self._submit(job, stream=True)
        async for chunk in handle:
            yield encode(chunk, engine.sample_rate, "pcm")
        if handle.end is not None and handle.end.error:
            raise SynthesisError(f"stream {job.request_id} failed: {handle.end.error}")
