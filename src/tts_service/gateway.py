"""The front service's way to the synthesizer: the queue bound, Retry-After, whole files and streams.

Every synthesis route goes through `Gateway`: it admits a job or refuses it at once with a 429 (more
than TTS_MAX_QUEUE in flight), calls the synthesizer, records the timing metrics, and turns a failed
call into a 500 that carries the request id. It holds the synthesizer's client (a `bentoml.depends`
proxy), and no BentoML import, so it runs in tests against anything with the same methods.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tts_service.errors import STATUS_CODES, Problem, ServiceError
from tts_service.metrics import real_time_factor, time_to_first_audio
from tts_service.schemas import (
    ModelInfo,
    SynthesisJob,
    SynthesisOutcome,
    VoiceCreateJob,
    VoiceInfo,
    VoicePreview,
    VoiceReply,
)
from tts_service.settings import Settings
from tts_service.validation import JobValidator

logger = logging.getLogger(__name__)


@dataclass
class OpenStream:
    """A stream whose first audio has arrived: the first bytes, the rest, and how to let it go."""

    first: bytes
    rest: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


class Gateway:
    def __init__(self, synthesizer: Any, settings: Settings) -> None:
        self.synthesizer = synthesizer
        self.settings = settings
        self._info: ModelInfo | None = None
        self._validator: JobValidator | None = None
        self._waiting = 0  # requests of this worker now queued at or running in the synthesizer
        self._call_s = 1.0  # moving average of a synthesizer call, for Retry-After

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.model_validate(await self.synthesizer.to_async.model_info())
        return self._info

    async def validator(self) -> JobValidator:
        if self._validator is None:
            self._validator = JobValidator(await self.model_info(), self.settings)
        return self._validator

    async def validator_for(self, name: str) -> JobValidator:
        """A validator that knows the saved voices too, unless `name` is a built-in speaker or alias
        (the voices are asked for afresh: another worker or process may have just made or deleted one)."""
        validator = await self.validator()
        return validator if validator.knows(name) else await self.voice_validator()

    async def voice_validator(self) -> JobValidator:
        """A validator that knows the saved voices as they are now."""
        return (await self.validator()).with_voices(await self.list_voices())

    async def list_voices(self) -> list[VoiceInfo]:
        return [VoiceInfo.model_validate(v) for v in await self.synthesizer.to_async.list_voices()]

    async def _voice_reply(self, call: Awaitable[Any]) -> VoiceInfo:
        reply = VoiceReply.model_validate(await call)
        if reply.voice is None:
            if reply.field is not None:
                problem = Problem(reply.field, reply.message, STATUS_CODES.get(reply.status, "invalid_" + reply.field))
                raise ServiceError(reply.status, reply.message, [problem])
            raise ServiceError(reply.status, reply.message)
        return reply.voice

    async def create_voice(self, job: VoiceCreateJob) -> VoiceInfo:
        """Cloning or designing runs a model: it counts against the queue bound like a synthesis."""
        self._admit()
        self._waiting += 1
        try:
            return await self._voice_reply(self.synthesizer.to_async.create_voice(job))
        finally:
            self._waiting -= 1

    async def find_voice(self, ref: str) -> VoiceInfo:
        return await self._voice_reply(self.synthesizer.to_async.find_voice(ref))

    async def delete_voice(self, ref: str) -> VoiceInfo:
        return await self._voice_reply(self.synthesizer.to_async.delete_voice(ref))

    async def voice_preview(self, ref: str) -> bytes:
        preview = VoicePreview.model_validate(await self.synthesizer.to_async.voice_preview(ref))
        if preview.status != 200:
            raise ServiceError(preview.status, preview.message, [Problem("voice_id", preview.message, "not_found")])
        return preview.wav

    async def ready_info(self) -> ModelInfo | None:
        """The model's description if the synthesizer is up, None while it starts."""
        try:
            return await self.model_info() if await self.synthesizer.is_ready(2) else None
        except Exception:  # connection refused while the synthesizer starts
            logger.debug("synthesizer not reachable", exc_info=True)
            return None

    def _admit(self) -> None:
        """The queue bound: beyond TTS_MAX_QUEUE requests in flight, refuse at once with a retry hint
        (the engine serves TTS_MAX_BATCH_SIZE at a time; the rest wait their turn for a slot)."""
        if self._waiting >= self.settings.max_queue:
            turns_ahead = math.ceil((self._waiting + 1) / self.settings.max_batch_size)
            raise ServiceError.overloaded(max(1, math.ceil(turns_ahead * self._call_s)))

    async def synthesize(self, job: SynthesisJob, route: str) -> SynthesisOutcome:
        """One whole-file job through the engine (its stream, drained by the synthesizer)."""
        self._admit()
        self._waiting += 1
        started = time.perf_counter()
        try:
            outcome = SynthesisOutcome.model_validate(await self.synthesizer.to_async.synthesize_file(job))
        except Exception as exc:
            logger.error("request %s failed at the synthesizer: %s", job.request_id, exc)
            raise ServiceError.failed(job.request_id) from exc
        finally:
            self._waiting -= 1
        elapsed = time.perf_counter() - started
        self._call_s = 0.8 * self._call_s + 0.2 * elapsed
        if outcome.num_samples:
            time_to_first_audio().labels(route).observe(elapsed)  # not streamed: the whole file comes at once
            real_time_factor().labels(route).observe(outcome.num_samples / outcome.sample_rate / elapsed)
        return outcome

    async def open_stream(self, job: SynthesisJob) -> OpenStream:
        """Start a stream and wait for its first audio, so that a failure before any audio is still a
        proper error response."""
        self._admit()
        self._waiting += 1
        chunks = self.synthesizer.to_async.stream_pcm(job)
        state = {"closed": False, "ended": False}

        async def rest() -> AsyncIterator[bytes]:
            async for data in chunks:
                yield data
            state["ended"] = True

        async def close() -> None:
            if state["closed"]:
                return
            state["closed"] = True
            self._waiting -= 1
            await chunks.aclose()
            if state["ended"]:
                return
            # The client left early. Closing our end does not reliably reach the synthesizer through
            # BentoML's client, so tell it outright, which frees the stream's slot at the next step.
            try:
                await self.synthesizer.to_async.cancel_stream(job.request_id)
            except Exception:
                logger.warning("could not cancel stream %s", job.request_id, exc_info=True)

        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            state["ended"] = True
            await close()
            raise ServiceError.failed(job.request_id, "synthesis produced no audio") from None
        except Exception as exc:
            await close()
            logger.exception("stream %s failed before its first audio", job.request_id)
            raise ServiceError.failed(job.request_id) from exc
        return OpenStream(first, rest(), close)
