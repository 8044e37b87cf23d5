"""Qwen3-TTS over HTTP: a front service for clients and a GPU service that batches synthesis.

`bentoml serve` (service: TTSService) starts both. Configuration: TTS_* environment variables (README).
"""

import asyncio
import logging
import math
import time
from typing import Annotated

import bentoml
from bentoml.validators import ContentType
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tts_service.audio import CONTENT_TYPES, AudioFormat, EncodedAudio, render
from tts_service.batching import synthesize_jobs
from tts_service.bentoml_fixes import keep_dependency_sessions
from tts_service.engine import ModelLoadError, TTSEngine
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
    Speaker,
    SpeakersResponse,
    SynthesisJob,
    SynthesisOutcome,
    text_type,
)
from tts_service.security import ApiKeyMiddleware, RequestGuardMiddleware, is_openai_route
from tts_service.settings import Settings
from tts_service.startup import abort_serving, preflight

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
AUDIO_HEADERS = ["X-TTS-Batch-Size", "X-TTS-Audio-Seconds", "X-TTS-Sample-Rate", "X-TTS-Truncated"]
ERROR_HEADERS = ["Retry-After", "X-Request-ID"]
# Routes that take a JSON body and queue for the synthesizer.
JSON_ROUTES = ("/v1/tts/synthesize", "/v1/audio/speech")


@bentoml.service(
    name="qwen3_tts_synthesizer",
    resources={"gpu": 1},
    workers=1,
    traffic={"timeout": settings.request_timeout_s},
)
class Synthesizer:
    """Owns the model. BentoML's adaptive batching merges concurrent calls into one generate call."""

    def __init__(self) -> None:
        try:
            self.engine = TTSEngine.load(settings)
        except ModelLoadError as exc:
            abort_serving(str(exc))  # does not return

    @bentoml.api(
        batchable=settings.max_batch_size > 1,
        max_batch_size=max(2, settings.max_batch_size),
        max_latency_ms=settings.max_latency_ms,
    )
    def synthesize_batch(self, jobs: list[SynthesisJob]) -> list[SynthesisOutcome]:
        return synthesize_jobs(self.engine, jobs)

    @bentoml.api
    def model_info(self) -> ModelInfo:
        return self.engine.describe()


info_app = FastAPI(title="Qwen3-TTS service information and OpenAI-compatible routes")
OPENAI_ERRORS = {400: {"model": OpenAIErrorResponse}}
# Field names of the synthesizer's refusals, as OpenAI's request calls them.
OPENAI_PARAMS = {"text": "input", "speaker": "voice", "language": "language", "instruct": "instructions"}


@info_app.exception_handler(RequestValidationError)
async def openai_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The mounted app only serves GETs and OpenAI's routes, so its validation errors use OpenAI's shape."""
    error = validation_error(exc.errors())
    return JSONResponse(error.body(), status_code=error.status_code)


@info_app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Errors raised by FastAPI itself (an unparseable body, a wrong method) in the route's own shape."""
    if not is_openai_route(request.url.path):
        return await http_exception_handler(request, exc)
    error = OpenAIError(str(exc.detail), param="body" if exc.status_code == 400 else None, status_code=exc.status_code)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


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


def audio_headers(outcome: SynthesisOutcome, audio: EncodedAudio) -> dict[str, str]:
    return {
        "X-TTS-Batch-Size": str(outcome.batch_size),
        "X-TTS-Audio-Seconds": f"{audio.seconds:.3f}",
        "X-TTS-Sample-Rate": str(audio.sample_rate),
        "X-TTS-Truncated": "true" if outcome.truncated else "false",
    }


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
        self._waiting = 0  # requests of this worker now queued at or running in the synthesizer
        self._call_s = 1.0  # moving average of a synthesizer call, for Retry-After
        keep_dependency_sessions(self.synthesizer)  # else every 100th call aborts the calls in flight

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.model_validate(await self.synthesizer.to_async.model_info())
        return self._info

    async def _synthesize(self, job: SynthesisJob) -> SynthesisOutcome:
        """One job through the shared adaptive batcher (every route uses this), within the queue bound."""
        if self._waiting >= settings.max_queue:
            batches_ahead = math.ceil(self._waiting / settings.max_batch_size)
            raise Overloaded(max(1, math.ceil(batches_ahead * self._call_s)))
        self._waiting += 1
        started = time.perf_counter()
        try:
            (outcome,) = await self.synthesizer.to_async.synthesize_batch([job])
        finally:
            self._waiting -= 1
        self._call_s = 0.8 * self._call_s + 0.2 * (time.perf_counter() - started)
        outcome = SynthesisOutcome.model_validate(outcome)
        if outcome.error_field == "internal":
            raise SynthesisFailed(outcome.error or "synthesis failed", job.request_id)
        return outcome

    @bentoml.api(route="/v1/tts/synthesize")
    async def synthesize(
        self,
        ctx: bentoml.Context,
        text: Text,
        speaker: Speaker,
        language: Language = "auto",
        instruct: Instruct = "",
        format: AudioFormat = "wav",
    ) -> Annotated[bytes, ContentType("audio/wav")]:
        """Speak `text` with a built-in speaker. Default: 16-bit PCM mono WAV at the model's rate (24 kHz);
        `format` also offers flac, mp3, opus (Ogg), aac (ADTS) and pcm (raw s16le)."""
        job = SynthesisJob(text=text, speaker=speaker, language=language or "auto", instruct=instruct)
        try:
            outcome = await self._synthesize(job)
        except Overloaded as exc:
            ctx.response.status_code = 429
            ctx.response.headers["Retry-After"] = str(exc.retry_after_s)
            body = ErrorResponse(error=str(exc), detail=[ErrorDetail(loc=[], msg=str(exc), type="overloaded")])
            return JSONResponse(body.model_dump(exclude_none=True), 429, {"Retry-After": str(exc.retry_after_s)})
        except SynthesisFailed as exc:
            ctx.response.status_code = 500
            body = ErrorResponse(error=str(exc), detail=[ErrorDetail(loc=[], msg=str(exc), type="internal")])
            return JSONResponse(body.model_dump(exclude_none=True), 500, {"X-Request-ID": exc.request_id})
        if outcome.error is not None or outcome.wav is None:
            field = outcome.error_field or "body"
            body = ErrorResponse(
                error=f"invalid {field}",
                detail=[
                    ErrorDetail(loc=[field], msg=outcome.error or "", type=f"unknown_{field}", allowed=outcome.allowed)
                ],
            )
            ctx.response.status_code = 400  # BentoML applies the context's status to returned responses too
            return JSONResponse(body.model_dump(exclude_none=True), status_code=400)
        audio = await asyncio.to_thread(render, outcome.wav, format)
        headers = audio_headers(outcome, audio)
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
        if body.stream_format != "audio":
            raise OpenAIError("stream_format 'sse' is not supported yet; use 'audio'", "stream_format", "unsupported")
        text = body.input.strip()
        if not text or len(text) > settings.max_text_chars:
            raise OpenAIError(
                f"input must be 1 to {settings.max_text_chars} characters after trimming whitespace, got {len(text)}",
                param="input",
                code="invalid_input",
            )
        info = await self._model_info()
        speaker = resolve_voice(body.voice_name, info, settings.openai_voice_map)
        job = SynthesisJob(text=text, speaker=speaker, language=body.language or "auto", instruct=body.instructions)
        try:
            outcome = await self._synthesize(job)
        except Overloaded as exc:
            raise OpenAIError(
                str(exc), code="overloaded", status_code=429, headers={"Retry-After": str(exc.retry_after_s)}
            ) from exc
        except SynthesisFailed as exc:
            raise OpenAIError(
                str(exc), code="internal_error", status_code=500, headers={"X-Request-ID": exc.request_id}
            ) from exc
        if outcome.error is not None or outcome.wav is None:
            param = OPENAI_PARAMS.get(outcome.error_field or "", outcome.error_field)
            raise OpenAIError(outcome.error or f"invalid {param}", param=param, code=f"invalid_{param}")
        audio = await asyncio.to_thread(render, outcome.wav, body.response_format, body.speed)
        return Response(audio.data, media_type=audio.content_type, headers=audio_headers(outcome, audio))

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


# Outermost first: refuse unauthenticated calls before reading bodies.
TTSService.add_asgi_middleware(ApiKeyMiddleware, keys=[key.get_secret_value() for key in settings.api_keys])
TTSService.add_asgi_middleware(RequestGuardMiddleware, max_body_bytes=settings.max_body_bytes, json_routes=JSON_ROUTES)
TTSService.add_asgi_middleware(
    OpenAPIDocsMiddleware,
    json_routes=JSON_ROUTES,
    queued_routes=JSON_ROUTES,
    api_keys=bool(settings.api_keys),
    audio_types=CONTENT_TYPES.values(),
)
