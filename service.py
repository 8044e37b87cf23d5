"""Qwen3-TTS over HTTP: a front service for clients and a GPU service whose step engine batches every request.

`bentoml serve` (service: TTSService) starts both. Configuration: TTS_* environment variables (README).
"""

import asyncio
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import ContentType
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tts_service.audio import CONTENT_TYPES, AudioFormat, EncodedAudio, encode, render
from tts_service.bentoml_fixes import AnswerOnCrash, keep_dependency_sessions, quiet_readiness_probe
from tts_service.engine import ModelLoadError, TTSEngine, UnknownVoiceError
from tts_service.metrics import real_time_factor, step_batch_size, time_to_first_audio
from tts_service.openai_api import (
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIErrorResponse,
    SpeechRequest,
    VoiceList,
    check_model,
    list_voices,
    resolve_voice,
    served_model_names,
    validation_error,
)
from tts_service.openapi_docs import OpenAPIDocsMiddleware
from tts_service.schemas import (
    ErrorDetail,
    ErrorResponse,
    HealthResponse,
    Instruct,
    Language,
    LanguagesResponse,
    ModelInfo,
    Seed,
    Speaker,
    SpeakersResponse,
    SynthesisJob,
    SynthesisOutcome,
    text_type,
)
from tts_service.security import ApiKeyMiddleware, RequestGuardMiddleware, is_openai_route
from tts_service.settings import Settings
from tts_service.startup import abort_serving, preflight
from tts_service.stream_http import StreamQuery, StreamRequest, Timing, audio_stream, check_voice, sse_stream

settings = Settings()
preflight(settings.model)
logger = logging.getLogger("tts_service")
if not logger.handlers:  # BentoML only configures its own loggers; each worker process imports this module
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(settings.log_level)
    logger.propagate = False
Text = text_type(settings.max_text_chars)

# Response headers a browser client (the Quest app's web view, the Streamlit demo) may read.
AUDIO_HEADERS = ["X-TTS-Batch-Size", "X-TTS-Audio-Seconds", "X-TTS-Sample-Rate", "X-TTS-Truncated", "X-TTS-Seed"]
ERROR_HEADERS = ["Retry-After", "X-Request-ID"]
# Routes that take a JSON body and queue for the synthesizer.
JSON_ROUTES = ("/v1/tts/synthesize", "/v1/tts/stream", "/v1/audio/speech")


@bentoml.service(
    name="qwen3_tts_synthesizer",
    resources={"gpu": 1},
    workers=1,
    traffic={"timeout": settings.request_timeout_s},
)
class Synthesizer:
    """Owns the model. Its step engine batches every request, streamed or not, at every decode step:
    a request joins the running batch at the next step and leaves when its audio is done."""

    def __init__(self) -> None:
        # The model loads in a thread, so that this worker answers /readyz (503, then 200) from the start
        # rather than leaving probes unanswered for as long as loading takes.
        self._engine: TTSEngine | None = None
        self._loaded = threading.Event()
        threading.Thread(target=self._load, name="model-load", daemon=True).start()

    def _load(self) -> None:
        try:
            engine = TTSEngine.load(settings)
        except ModelLoadError as exc:
            abort_serving(str(exc))  # does not return
        except BaseException:
            logger.exception("loading the model failed")
            abort_serving("loading the model failed (traceback above)")
        engine.scheduler.on_step = step_batch_size().observe
        self._engine = engine
        self._loaded.set()

    def __is_ready__(self) -> bool:
        return self._loaded.is_set()

    @property
    def engine(self) -> TTSEngine:
        assert self._engine is not None, "the model is still loading"
        return self._engine

    async def _wait_loaded(self) -> None:
        """Calls that arrive while the model loads wait for it, as they would for a slow start."""
        if not self._loaded.is_set():
            await asyncio.to_thread(self._loaded.wait)

    def _start(self, job: SynthesisJob, stream: bool):
        """The engine's handle for a job, or the refusal naming the field and the allowed values."""
        try:
            request = self.engine.request_for(job.text, job.speaker, job.language, job.instruct, job.seed)
        except UnknownVoiceError as exc:
            return SynthesisOutcome(error_field=exc.field, error=str(exc), allowed=exc.allowed)
        except ValueError as exc:
            return SynthesisOutcome(error_field="text", error=str(exc))
        return self.engine.submit(request, job.request_id, asyncio.get_running_loop(), stream=stream)

    @bentoml.api
    async def synthesize_file(self, job: SynthesisJob) -> SynthesisOutcome:
        """A whole request as 16-bit PCM: the same engine stream as /v1/tts/stream, drained."""
        await self._wait_loaded()
        handle = self._start(job, stream=False)
        if isinstance(handle, SynthesisOutcome):
            return handle
        chunks = [chunk async for chunk in handle]
        end = handle.end
        if end is None or end.error:
            return SynthesisOutcome(error_field="internal", error=f"synthesis failed (request id {job.request_id})")
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return SynthesisOutcome(
            pcm=encode(samples, self.engine.sample_rate, "pcm"),
            sample_rate=self.engine.sample_rate,
            num_samples=len(samples),
            frames=end.frames,
            truncated=end.truncated,
            batch_size=end.max_batch,
        )

    @bentoml.api
    async def model_info(self) -> ModelInfo:
        await self._wait_loaded()
        return self.engine.describe()

    @bentoml.api
    async def cancel_stream(self, request_id: str) -> bool:
        await self._wait_loaded()
        return self.engine.cancel(request_id)

    @bentoml.api
    async def stream_pcm(self, job: SynthesisJob) -> AsyncGenerator[bytes, None]:
        """16-bit PCM chunks as the engine decodes them (the front service validated the job)."""
        await self._wait_loaded()
        handle = self._start(job, stream=True)
        if isinstance(handle, SynthesisOutcome):
            raise ValueError(handle.error)
        async for chunk in handle:
            yield encode(chunk, self.engine.sample_rate, "pcm")
        if handle.end is not None and handle.end.error:
            raise RuntimeError(f"stream {job.request_id} failed: {handle.end.error}")


info_app = FastAPI(title="Qwen3-TTS service information and OpenAI-compatible routes")
OPENAI_ERRORS = {400: {"model": OpenAIErrorResponse}}
# Field names of the synthesizer's refusals, as OpenAI's request calls them.
OPENAI_PARAMS = {"text": "input", "speaker": "voice", "language": "language", "instruct": "instructions"}


@info_app.exception_handler(RequestValidationError)
async def openai_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Validation errors of the mounted app's routes, in the shape of the route's clients."""
    if not is_openai_route(request.url.path):
        details = [
            ErrorDetail(
                loc=[str(part) for part in e.get("loc", ()) if part not in ("body", "query")],
                msg=e.get("msg", ""),
                type=e.get("type", ""),
            )
            for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(d.loc) or 'body'}: {d.msg}" for d in details)
        return JSONResponse(ErrorResponse(error=summary, detail=details).model_dump(exclude_none=True), 400)
    error = validation_error(exc.errors())
    return JSONResponse(error.body(), status_code=error.status_code)


@info_app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Errors raised by FastAPI itself (an unparseable body, a wrong method) in the route's own shape."""
    path, headers = request.url.path, dict(exc.headers or {})
    if exc.status_code == 405:  # every method of the path, not just those of the first route matched
        methods = {m for r in info_app.routes if getattr(r, "path", None) == path for m in getattr(r, "methods", ())}
        headers["Allow"] = ", ".join(sorted(methods))
    if is_openai_route(path):
        param = "body" if exc.status_code == 400 else None
        error = OpenAIError(str(exc.detail), param=param, status_code=exc.status_code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=headers)
    loc = ["body"] if exc.status_code == 400 else []
    body = ErrorResponse(
        error=str(exc.detail), detail=[ErrorDetail(loc=loc, msg=str(exc.detail), type=str(exc.status_code))]
    )
    return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status_code, headers=headers)


@info_app.exception_handler(OpenAIError)
async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


class Overloaded(Exception):
    """More requests wait for synthesis than TTS_MAX_QUEUE: refuse at once rather than pile up."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the service is busy; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class SynthesisFailed(Exception):
    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


def _plain_error(
    status: int,
    error: str,
    field: str | None,
    message: str,
    allowed: list[str] | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    detail = ErrorDetail(loc=[field] if field else [], msg=message, type=f"invalid_{field}" if field else str(status))
    detail.allowed = allowed
    body = ErrorResponse(error=error, detail=[detail])
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def new_job(text: str, speaker: str, language: str | None, instruct: str, seed: int | None) -> SynthesisJob:
    """A job with its seed fixed here, so the client can be told it (X-TTS-Seed) and replay the line."""
    seed = secrets.randbits(63) if seed is None else seed
    return SynthesisJob(text=text, speaker=speaker, language=language or "auto", instruct=instruct, seed=seed)


def stream_headers(job: SynthesisJob, sample_rate: int) -> dict[str, str]:
    return {
        "X-Request-ID": job.request_id,
        "X-TTS-Sample-Rate": str(sample_rate),
        "X-TTS-Seed": str(job.seed),
        "Cache-Control": "no-store",
    }


def audio_headers(job: SynthesisJob, outcome: SynthesisOutcome, audio: EncodedAudio) -> dict[str, str]:
    return {
        "X-TTS-Batch-Size": str(outcome.batch_size),
        "X-TTS-Audio-Seconds": f"{audio.seconds:.3f}",
        "X-TTS-Sample-Rate": str(audio.sample_rate),
        "X-TTS-Truncated": "true" if outcome.truncated else "false",
        "X-TTS-Seed": str(job.seed),
    }


def openai_failure(exc: Overloaded | SynthesisFailed) -> OpenAIError:
    """A refusal for load (429 with Retry-After) or a failed generation (500 with its request id), in OpenAI's shape."""
    if isinstance(exc, Overloaded):
        return OpenAIError(
            str(exc), code="overloaded", status_code=429, headers={"Retry-After": str(exc.retry_after_s)}
        )
    return OpenAIError(str(exc), code="internal_error", status_code=500, headers={"X-Request-ID": exc.request_id})


@bentoml.service(
    name="qwen3_tts",
    http={
        "host": settings.host,
        "port": settings.port,
        "cors": {
            "enabled": True,
            "access_control_allow_origins": settings.cors_origins,
            "access_control_allow_methods": ["GET", "POST", "OPTIONS"],
            "access_control_allow_headers": ["*"],
            "access_control_expose_headers": AUDIO_HEADERS + ERROR_HEADERS,
        },
    },
    traffic={"timeout": settings.request_timeout_s, "max_concurrency": settings.max_concurrency},
)
@bentoml.asgi_app(info_app, path="/")
class TTSService:
    """Text-to-speech with Qwen3-TTS CustomVoice: 9 premium speakers, 10 languages, style instructions."""

    synthesizer = bentoml.depends(Synthesizer)

    def __init__(self) -> None:
        self._info: ModelInfo | None = None
        self._synthesizer_ready = False
        self._waiting = 0  # requests of this worker now queued at or running in the synthesizer
        self._call_s = 1.0  # moving average of a synthesizer call, for Retry-After
        keep_dependency_sessions(self.synthesizer)  # else every 100th call aborts the calls in flight
        quiet_readiness_probe(self.synthesizer)  # else /readyz can hang while the model loads

    async def __is_ready__(self) -> bool:
        """Ready once the synthesizer has said so; a quick probe until then, so /readyz answers fast."""
        if not self._synthesizer_ready:
            self._synthesizer_ready = await self.synthesizer.is_ready(1)
        return self._synthesizer_ready

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.model_validate(await self.synthesizer.to_async.model_info())
        return self._info

    def _admit(self) -> None:
        """The queue bound: beyond TTS_MAX_QUEUE requests in flight, refuse at once with a retry hint
        (the engine serves TTS_MAX_BATCH_SIZE at a time; the rest wait their turn for a slot)."""
        if self._waiting >= settings.max_queue:
            turns_ahead = math.ceil((self._waiting + 1) / settings.max_batch_size)
            raise Overloaded(max(1, math.ceil(turns_ahead * self._call_s)))

    async def _synthesize(self, job: SynthesisJob, route: str) -> SynthesisOutcome:
        """One whole-file job through the engine (its stream, drained), within the queue bound."""
        self._admit()
        self._waiting += 1
        started = time.perf_counter()
        try:
            outcome = await self.synthesizer.to_async.synthesize_file(job)
        finally:
            self._waiting -= 1
        elapsed = time.perf_counter() - started
        self._call_s = 0.8 * self._call_s + 0.2 * elapsed
        outcome = SynthesisOutcome.model_validate(outcome)
        if outcome.num_samples:
            time_to_first_audio().labels(route).observe(elapsed)  # not streamed: the whole file comes at once
            real_time_factor().labels(route).observe(outcome.num_samples / outcome.sample_rate / elapsed)
        if outcome.error_field == "internal":
            raise SynthesisFailed(outcome.error or "synthesis failed", job.request_id)
        return outcome

    async def _open_stream(self, job: SynthesisJob) -> tuple[bytes, AsyncIterator[bytes], Any]:
        """Start a stream at the synthesizer and wait for its first audio, so that a failure before any
        audio is still a proper error response. Returns the first bytes, the rest, and a closer."""
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
            message = f"synthesis produced no audio (request id {job.request_id})"
            raise SynthesisFailed(message, job.request_id) from None
        except Exception as exc:
            await close()
            logger.exception("stream %s failed before its first audio", job.request_id)
            raise SynthesisFailed(f"synthesis failed (request id {job.request_id})", job.request_id) from exc
        return first, rest(), close

    @info_app.post(
        "/v1/tts/stream",
        response_class=StreamingResponse,
        responses={200: {"content": {"audio/wav": {}, "audio/pcm": {}}}, 400: {"model": ErrorResponse}},
    )
    async def stream(self, body: StreamRequest) -> Response:
        """Speak `text` as a stream: audio starts after the first few frames instead of after the whole text.
        `wav`: one RIFF header with unknown sizes, then 16-bit PCM; `pcm`: raw s16le mono at 24 kHz."""
        return await self._stream_response(body)

    @info_app.get(
        "/v1/tts/stream",
        response_class=StreamingResponse,
        responses={200: {"content": {"audio/wav": {}, "audio/pcm": {}}}, 400: {"model": ErrorResponse}},
    )
    async def stream_get(self, query: Annotated[StreamQuery, Query()]) -> Response:
        """The same stream for a URL: `<audio src="/v1/tts/stream?text=Hello&speaker=Ryan">` plays as it
        arrives in browsers (a browser's audio element can only GET)."""
        return await self._stream_response(query)

    async def _stream_response(self, body: StreamRequest | StreamQuery) -> Response:
        timing = Timing("/v1/tts/stream", 0)
        text = body.text.strip()
        if not text or len(text) > settings.max_text_chars:
            message = f"text must be 1 to {settings.max_text_chars} characters after trimming whitespace"
            return _plain_error(400, "invalid text", "text", message)
        info = await self._model_info()
        timing.sample_rate = info.sample_rate
        problem = check_voice(info, body.speaker, body.language)
        if problem:
            field, message, allowed = problem
            return _plain_error(400, f"invalid {field}", field, message, allowed)
        job = new_job(text, body.speaker, body.language, body.instruct, body.seed)
        try:
            first, rest, close = await self._open_stream(job)
        except Overloaded as exc:
            return _plain_error(429, str(exc), None, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
        except SynthesisFailed as exc:
            return _plain_error(500, str(exc), None, str(exc), headers={"X-Request-ID": exc.request_id})
        headers = stream_headers(job, info.sample_rate)
        return StreamingResponse(
            audio_stream(first, rest, body.format, timing, close),
            media_type=CONTENT_TYPES[body.format],
            headers=headers,
        )

    @bentoml.api(route="/v1/tts/synthesize")
    async def synthesize(
        self,
        ctx: bentoml.Context,
        text: Text,
        speaker: Speaker,
        language: Language = "auto",
        instruct: Instruct = "",
        format: AudioFormat = "wav",
        seed: Seed = None,
    ) -> Annotated[bytes, ContentType("audio/wav")]:
        """Speak `text` with a built-in speaker. Default: 16-bit PCM mono WAV at the model's rate (24 kHz);
        `format` also offers flac, mp3, opus (Ogg), aac (ADTS) and pcm (raw s16le)."""
        job = new_job(text, speaker, language, instruct, seed)
        try:
            outcome = await self._synthesize(job, "/v1/tts/synthesize")
        except Overloaded as exc:
            ctx.response.status_code = 429
            ctx.response.headers["Retry-After"] = str(exc.retry_after_s)
            body = ErrorResponse(error=str(exc), detail=[ErrorDetail(loc=[], msg=str(exc), type="overloaded")])
            return JSONResponse(body.model_dump(exclude_none=True), 429, {"Retry-After": str(exc.retry_after_s)})
        except SynthesisFailed as exc:
            ctx.response.status_code = 500
            body = ErrorResponse(error=str(exc), detail=[ErrorDetail(loc=[], msg=str(exc), type="internal")])
            return JSONResponse(body.model_dump(exclude_none=True), 500, {"X-Request-ID": exc.request_id})
        if outcome.error is not None or outcome.pcm is None:
            field = outcome.error_field or "body"
            body = ErrorResponse(
                error=f"invalid {field}",
                detail=[
                    ErrorDetail(loc=[field], msg=outcome.error or "", type=f"unknown_{field}", allowed=outcome.allowed)
                ],
            )
            ctx.response.status_code = 400  # BentoML applies the context's status to returned responses too
            return JSONResponse(body.model_dump(exclude_none=True), status_code=400)
        audio = await asyncio.to_thread(render, outcome.pcm, outcome.sample_rate, format)
        headers = audio_headers(job, outcome, audio)
        ctx.response.headers.update(headers)
        if format == "wav":
            return audio.data
        return Response(audio.data, media_type=audio.content_type, headers=headers)

    @info_app.post(
        "/v1/audio/speech",
        response_class=Response,
        responses={200: {"content": {ct: {} for ct in CONTENT_TYPES.values()}}, **OPENAI_ERRORS},
    )
    async def speech(self, body: SpeechRequest) -> Response:
        """OpenAI-compatible text to speech: the `openai` SDKs and their users call this unchanged."""
        check_model(body.model, served_model_names(settings.model, settings.openai_model_aliases))
        streamable = body.response_format in ("pcm", "wav") and body.speed == 1.0
        if body.stream_format == "sse" and not streamable:
            raise OpenAIError(
                "stream_format 'sse' needs response_format 'pcm' or 'wav' and speed 1.0",
                param="response_format" if body.response_format not in ("pcm", "wav") else "speed",
                code="unsupported_for_sse",
            )
        text = body.input.strip()
        if not text or len(text) > settings.max_text_chars:
            raise OpenAIError(
                f"input must be 1 to {settings.max_text_chars} characters after trimming whitespace, got {len(text)}",
                param="input",
                code="invalid_input",
            )
        info = await self._model_info()
        speaker = resolve_voice(body.voice_name, info, settings.openai_voice_map)
        job = new_job(text, speaker, body.language, body.instructions, body.seed)
        if body.language and (problem := check_voice(info, speaker, body.language)):
            raise OpenAIError(problem[1], param="language", code="invalid_language")
        # Streamed when asked for: SSE, or stream_format "audio" set explicitly for pcm/wav at speed 1.
        if body.stream_format == "sse" or (streamable and "stream_format" in body.model_fields_set):
            return await self._speech_stream(job, body, info.sample_rate)
        try:
            outcome = await self._synthesize(job, "/v1/audio/speech")
        except (Overloaded, SynthesisFailed) as exc:
            raise openai_failure(exc) from exc
        if outcome.error is not None or outcome.pcm is None:
            param = OPENAI_PARAMS.get(outcome.error_field or "", outcome.error_field)
            raise OpenAIError(outcome.error or f"invalid {param}", param=param, code=f"invalid_{param}")
        audio = await asyncio.to_thread(render, outcome.pcm, outcome.sample_rate, body.response_format, body.speed)
        return Response(audio.data, media_type=audio.content_type, headers=audio_headers(job, outcome, audio))

    async def _speech_stream(self, job: SynthesisJob, body: SpeechRequest, sample_rate: int) -> Response:
        route = "/v1/audio/speech:" + body.stream_format
        timing = Timing(route, sample_rate)
        try:
            first, rest, close = await self._open_stream(job)
        except (Overloaded, SynthesisFailed) as exc:
            raise openai_failure(exc) from exc
        headers = stream_headers(job, sample_rate)
        fmt = "wav" if body.response_format == "wav" else "pcm"
        if body.stream_format == "sse":
            body_stream = sse_stream(first, rest, fmt, timing, close, len(job.text))
            return StreamingResponse(body_stream, media_type="text/event-stream", headers=headers)
        return StreamingResponse(
            audio_stream(first, rest, fmt, timing, close), media_type=CONTENT_TYPES[fmt], headers=headers
        )

    @info_app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        """OpenAI's model list: the loaded model and the names accepted for it."""
        names = served_model_names(settings.model, settings.openai_model_aliases)
        return ModelList(data=[ModelCard(id=name) for name in names])

    @info_app.get("/v1/audio/voices", response_model=VoiceList)
    async def voices(self) -> VoiceList:
        """Voices for /v1/audio/speech: the model's speakers and the OpenAI names mapped to each."""
        return list_voices(await self._model_info(), settings.openai_voice_map)

    @info_app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(self) -> HealthResponse | JSONResponse:
        """Whether the model is loaded and the synthesizer answers."""
        try:
            ready = await self.synthesizer.is_ready(2)
            info = await self._model_info() if ready else None
        except Exception:  # connection refused while the synthesizer starts
            logger.debug("synthesizer not reachable", exc_info=True)
            info = None
        if info is None:
            body = HealthResponse(
                status="unavailable", model_loaded=False, model=settings.model, max_text_chars=settings.max_text_chars
            )
            return JSONResponse(body.model_dump(), status_code=503)
        return HealthResponse(
            status="ok",
            model_loaded=True,
            model=info.model,
            max_text_chars=settings.max_text_chars,
            supports_instruct=info.supports_instruct,
            sample_rate=info.sample_rate,
        )

    @info_app.get("/v1/tts/speakers", response_model=SpeakersResponse)
    async def speakers(self) -> SpeakersResponse:
        """The loaded model's speakers, with description and native language where known."""
        info = await self._model_info()
        return SpeakersResponse(speakers=[s.name for s in info.speakers], details=info.speakers)

    @info_app.get("/v1/tts/languages", response_model=LanguagesResponse)
    async def languages(self) -> LanguagesResponse:
        """The loaded model's languages; 'auto' lets the model detect it."""
        info = await self._model_info()
        return LanguagesResponse(languages=info.languages)


# Outermost first: answer every request even if a route crashes; refuse unauthenticated calls before
# reading bodies.
TTSService.add_asgi_middleware(AnswerOnCrash)
TTSService.add_asgi_middleware(ApiKeyMiddleware, keys=[key.get_secret_value() for key in settings.api_keys])
TTSService.add_asgi_middleware(RequestGuardMiddleware, max_body_bytes=settings.max_body_bytes, json_routes=JSON_ROUTES)
TTSService.add_asgi_middleware(
    OpenAPIDocsMiddleware,
    json_routes=JSON_ROUTES,
    queued_routes=JSON_ROUTES,
    api_keys=bool(settings.api_keys),
    audio_types=CONTENT_TYPES.values(),
)
