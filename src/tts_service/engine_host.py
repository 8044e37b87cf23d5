"""The synthesizer service's side of a job: the engines, loaded in the background, serving validated jobs
and saved voices.

The models load in a thread so that the synthesizer's worker answers `/readyz` (503, then 200) from
the start instead of leaving probes unanswered while a 4 GB checkpoint loads. A model that cannot load
stops the whole server with one message (startup.abort_serving). TTS_MODEL is always loaded;
TTS_CLONE_MODEL and TTS_DESIGN_MODEL, when set, load beside it, each with its own step engine. A voice
library that cannot be opened leaves the built-in speakers working and the voice routes answering 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable

import numpy as np

from tts_service.audio import encode
from tts_service.engine import ModelLoadError, SynthesisError, TTSEngine
from tts_service.metrics import queue_wait, step_batch_size
from tts_service.request_handle import RequestHandle
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
from tts_service.startup import abort_serving, freeze_loaded_objects
from tts_service.voice_catalog import VoiceCatalog, VoiceUnavailable
from tts_service.voice_library import DuplicateVoiceName, StoredVoice, UnknownVoice, VoiceLibrary, VoiceStoreError

logger = logging.getLogger(__name__)


class EngineHost:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: TTSEngine | None = None
        self._engines: dict[str, TTSEngine] = {}  # each as soon as it has loaded, for `close`
        self._catalog: VoiceCatalog | None = None
        self._store_error = ""
        self._loaded = threading.Event()
        threading.Thread(target=self._load, name="model-load", daemon=True).start()

    def _load(self) -> None:
        engines = self._engines
        try:
            for setting, spec in self.settings.model_specs().items():
                if spec:
                    engines[setting] = TTSEngine.load(self.settings, setting)
                    engines[setting].scheduler.on_step = step_batch_size().observe
                    engines[setting].scheduler.on_admit = queue_wait().observe
            for engine in engines.values():  # decoder processes started during the loads; ready before we are
                engine.scheduler.decoder.wait_ready()
        except ModelLoadError as exc:
            abort_serving(str(exc))  # does not return
        except BaseException:
            logger.exception("loading the models failed")
            abort_serving("loading the models failed (traceback above)")
        try:
            library = VoiceLibrary(self.settings.voices_dir)
            self._catalog = VoiceCatalog(library, engines.get("TTS_CLONE_MODEL"), engines.get("TTS_DESIGN_MODEL"))
        except VoiceStoreError as exc:
            self._store_error = str(exc)
            logger.error("saved voices are unavailable: %s", exc)
        self._engine = engines["TTS_MODEL"]
        freeze_loaded_objects("synthesizer")
        self._loaded.set()

    def close(self) -> None:
        """On shutdown: stop the loaded engines' threads (`TTSEngine.close`), so that the interpreter's exit
        does not abort on a thread inside a torch call. A load in progress is not waited for."""
        for setting, engine in list(self._engines.items()):
            if not engine.close():
                logger.warning("%s's engine threads did not stop within 10 s", setting)

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
        """The front validated the job against these models: a refusal here is our failure (or a voice
        deleted meanwhile), not the client's."""
        engine = await self.engine()
        if job.voice_id is None:
            request = engine.request_for(job.text, job.speaker, job.language, job.instruct, job.seed)
        else:
            catalog = self._voices()
            try:
                speaking = catalog.speaking(job.voice_id, job.language)
            except (UnknownVoice, VoiceUnavailable) as exc:
                raise SynthesisError(f"request {job.request_id}: {exc}") from exc
            engine = speaking.engine
            request = catalog.request(speaking, job.text, job.seed)
        return engine, engine.submit(request, job.request_id, asyncio.get_running_loop(), stream=stream)

    async def model_info(self) -> ModelInfo:
        info = (await self.engine()).describe()
        catalog = self._catalog
        if catalog is not None:
            info.clone_model = catalog.clone_engine.model_id if catalog.clone_engine else None
            info.design_model = catalog.design_engine.model_id if catalog.design_engine else None
        else:
            info.clone_model, info.design_model = self.settings.clone_model, self.settings.design_model
        return info

    # ---- saved voices ----------------------------------------------------------------------------

    def _voices(self) -> VoiceCatalog:
        if self._catalog is None:
            raise VoiceStoreError(self._store_error or "the voice library is not open")
        return self._catalog

    def voice_info(self, voice: StoredVoice) -> VoiceInfo:
        return VoiceInfo(
            id=voice.id,
            name=voice.name,
            kind=voice.kind,
            description=voice.text if voice.kind == "design" else None,
            transcript=(voice.text or None) if voice.kind == "clone" else None,
            language=voice.language,
            created=int(voice.created),
            speaks_with=self._voices().needs(voice),
            preview_url=f"/v1/audio/voices/{voice.id}/preview",
        )

    async def _voice_call(self, call: Callable[[VoiceCatalog], StoredVoice]) -> VoiceReply:
        """Run a blocking catalog call in a thread; its refusals (and a library that is not open) become
        replies with a status."""
        await self.engine()
        try:
            voice = await asyncio.to_thread(call, self._voices())
            return VoiceReply(voice=self.voice_info(voice))
        except DuplicateVoiceName as exc:
            return VoiceReply(status=409, field="name", message=str(exc))
        except UnknownVoice as exc:
            return VoiceReply(status=404, field="voice_id", message=str(exc))
        except VoiceUnavailable as exc:
            return VoiceReply(status=400, field=None, message=str(exc))
        except VoiceStoreError as exc:
            logger.error("voice library: %s", exc)
            return VoiceReply(status=503, message=str(exc))
        except ValueError as exc:  # the name's form (voice_library.check_name)
            return VoiceReply(status=400, field="name", message=str(exc))

    async def create_voice(self, job: VoiceCreateJob) -> VoiceReply:
        if job.kind == "clone":
            audio = np.frombuffer(job.pcm, dtype="<f4").astype(np.float32)
            return await self._voice_call(
                lambda c: c.create_clone(job.name, audio, job.sample_rate, job.text, job.language)
            )
        return await self._voice_call(lambda c: c.create_design(job.name, job.text, job.language, job.sample_text))

    async def find_voice(self, ref: str) -> VoiceReply:
        return await self._voice_call(lambda c: c.library.get(ref))

    async def delete_voice(self, ref: str) -> VoiceReply:
        return await self._voice_call(lambda c: c.delete(ref))

    async def list_voices(self) -> list[VoiceInfo]:
        await self.engine()
        catalog = self._catalog
        return [] if catalog is None else [self.voice_info(v) for v in await asyncio.to_thread(catalog.library.list)]

    async def voice_preview(self, ref: str) -> VoicePreview:
        await self.engine()
        try:
            return VoicePreview(wav=await asyncio.to_thread(self._voices().preview, ref))
        except UnknownVoice as exc:
            return VoicePreview(status=404, message=str(exc))
        except (VoiceStoreError, OSError) as exc:
            return VoicePreview(status=503, message=str(exc))

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
