"""Qwen3-TTS over HTTP: a front service for clients and a GPU service that batches synthesis.

`bentoml serve` (service: TTSService) starts both. Configuration: TTS_* environment variables (README).
"""

import logging
from typing import Annotated

import bentoml
from bentoml.validators import ContentType
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tts_service.batching import synthesize_jobs
from tts_service.engine import ModelLoadError, TTSEngine
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


info_app = FastAPI(title="Qwen3-TTS service information")


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
            "access_control_expose_headers": AUDIO_HEADERS,
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

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo.model_validate(await self.synthesizer.to_async.model_info())
        return self._info

    @bentoml.api(route="/v1/tts/synthesize")
    async def synthesize(
        self,
        ctx: bentoml.Context,
        text: Text,
        speaker: Speaker,
        language: Language = "auto",
        instruct: Instruct = "",
    ) -> Annotated[bytes, ContentType("audio/wav")]:
        """Speak `text` with a built-in speaker; returns a 16-bit PCM mono WAV at the model's rate."""
        job = SynthesisJob(text=text, speaker=speaker, language=language or "auto", instruct=instruct)
        (outcome,) = await self.synthesizer.to_async.synthesize_batch([job])
        outcome = SynthesisOutcome.model_validate(outcome)
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
        ctx.response.headers.update(
            {
                "X-TTS-Batch-Size": str(outcome.batch_size),
                "X-TTS-Audio-Seconds": f"{outcome.num_samples / outcome.sample_rate:.3f}",
                "X-TTS-Sample-Rate": str(outcome.sample_rate),
                "X-TTS-Truncated": "true" if outcome.truncated else "false",
            }
        )
        return outcome.wav

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
            body = HealthResponse(status="unavailable", model_loaded=False, model=settings.model)
            return JSONResponse(body.model_dump(), status_code=503)
        return HealthResponse(status="ok", model_loaded=True, model=info.model)

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
