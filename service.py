"""Qwen3-TTS over HTTP: a front service for clients and a GPU service whose step engine batches every request.

`bentoml serve` (service: TTSService) starts both. Configuration: TTS_* environment variables (README).
How a request flows: docs/ARCHITECTURE.md.
"""

from collections.abc import AsyncGenerator
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType

from tts_service.app import build_app, field_choices
from tts_service.audio import CONTENT_TYPES
from tts_service.audio_responses import AUDIO_HEADERS, ERROR_HEADERS
from tts_service.bentoml_fixes import AnswerInJson, keep_dependency_sessions, quiet_readiness_probe
from tts_service.errors import ServiceError, error_response
from tts_service.gateway import Gateway
from tts_service.openai_api import SpeechRequest
from tts_service.openapi_docs import OpenAPIDocsMiddleware
from tts_service.routes.tts import synthesize_file
from tts_service.schemas import (
    ModelInfo,
    StreamRequest,
    SynthesisJob,
    SynthesisOutcome,
    SynthesizeRequest,
    VoiceCreateJob,
    VoiceDesignRequest,
    VoiceInfo,
    VoicePreview,
    VoiceReply,
)
from tts_service.security import ApiKeyMiddleware, RequestGuardMiddleware
from tts_service.settings import Settings
from tts_service.startup import configure_logging, freeze_loaded_objects, preflight

settings = Settings()
preflight(settings.model_specs())
configure_logging(settings.log_level)
app = build_app()
SYNTHESIZE = "/v1/tts/synthesize"
# The JSON bodies, each checked against its model before any route reads it (security.py).
BODY_MODELS = {
    SYNTHESIZE: SynthesizeRequest,
    "/v1/tts/stream": StreamRequest,
    "/v1/audio/speech": SpeechRequest,
    "/v1/audio/voices": VoiceDesignRequest,  # or a clone's multipart upload, up to TTS_MAX_UPLOAD_BYTES
}
UPLOAD_ROUTES = {"/v1/audio/voices": settings.max_upload_bytes}


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
        from tts_service.engine_host import EngineHost  # torch and the model: this worker's only, not the front's

        self.host = EngineHost(settings)  # loads in the background

    def __is_ready__(self) -> bool:
        return self.host.ready

    @bentoml.on_shutdown
    def close(self) -> None:
        self.host.close()

    @bentoml.api
    async def synthesize_file(self, job: SynthesisJob) -> SynthesisOutcome:
        return await self.host.synthesize_file(job)

    @bentoml.api
    async def stream_pcm(self, job: SynthesisJob) -> AsyncGenerator[bytes, None]:
        async for chunk in self.host.stream_pcm(job):
            yield chunk

    @bentoml.api
    async def model_info(self) -> ModelInfo:
        return await self.host.model_info()

    @bentoml.api
    async def cancel_stream(self, request_id: str) -> bool:
        return await self.host.cancel(request_id)

    @bentoml.api
    async def create_voice(self, job: VoiceCreateJob) -> VoiceReply:
        return await self.host.create_voice(job)

    @bentoml.api
    async def list_voices(self) -> list[VoiceInfo]:
        return await self.host.list_voices()

    @bentoml.api
    async def find_voice(self, ref: str) -> VoiceReply:
        return await self.host.find_voice(ref)

    @bentoml.api
    async def delete_voice(self, ref: str) -> VoiceReply:
        return await self.host.delete_voice(ref)

    @bentoml.api
    async def voice_preview(self, ref: str) -> VoicePreview:
        return await self.host.voice_preview(ref)


@bentoml.service(
    name="qwen3_tts",
    http={
        "host": settings.host,
        "port": settings.port,
        "cors": {
            "enabled": True,
            "access_control_allow_origins": settings.cors_origins,
            "access_control_allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],
            "access_control_allow_headers": ["*"],
            "access_control_expose_headers": AUDIO_HEADERS + ERROR_HEADERS,
        },
    },
    traffic={"timeout": settings.request_timeout_s, "max_concurrency": settings.max_concurrency},
)
@bentoml.asgi_app(app, path="/")
class TTSService:
    """Text-to-speech with Qwen3-TTS CustomVoice: 9 premium speakers, 10 languages, style instructions."""

    synthesizer = bentoml.depends(Synthesizer)

    def __init__(self) -> None:
        keep_dependency_sessions(self.synthesizer)  # else every 100th call aborts the calls in flight
        quiet_readiness_probe(self.synthesizer)  # else /readyz can hang while the model loads
        self.gateway = app.state.gateway = Gateway(self.synthesizer, settings)
        self._synthesizer_ready = False
        freeze_loaded_objects("front service")

    async def __is_ready__(self) -> bool:
        """Ready once the synthesizer has said so; a quick probe until then, so /readyz answers fast."""
        if not self._synthesizer_ready:
            self._synthesizer_ready = await self.synthesizer.is_ready(1)
        return self._synthesizer_ready

    @bentoml.api(route=SYNTHESIZE, input_spec=SynthesizeRequest)
    async def synthesize(self, **body: Any) -> Annotated[bytes, ContentType("audio/wav")]:
        """Speak `text` with a built-in speaker. Default: 16-bit PCM mono WAV at the model's rate (24 kHz);
        `format` also offers flac, mp3, opus (Ogg), aac (ADTS) and pcm (raw s16le)."""
        try:
            return await synthesize_file(self.gateway, SynthesizeRequest.model_construct(**body))
        except ServiceError as exc:
            exc.log("POST", SYNTHESIZE)
            return error_response(exc, SYNTHESIZE)


# Outermost first: answer every request in JSON, even if a route crashes or the router refuses it; refuse
# unauthenticated calls before reading bodies; check each JSON body against its route's model; tell the
# truth in /docs.json.
TTSService.add_asgi_middleware(AnswerInJson)
TTSService.add_asgi_middleware(ApiKeyMiddleware, keys=[key.get_secret_value() for key in settings.api_keys])
TTSService.add_asgi_middleware(
    RequestGuardMiddleware,
    max_body_bytes=settings.max_body_bytes,
    body_models=BODY_MODELS,
    upload_routes=UPLOAD_ROUTES,
    choices=field_choices(app),
)
TTSService.add_asgi_middleware(
    OpenAPIDocsMiddleware,
    body_routes=[path for path in BODY_MODELS if path not in UPLOAD_ROUTES],  # the audio routes
    api_keys=bool(settings.api_keys),
    audio_types=CONTENT_TYPES.values(),
    max_text_chars=settings.max_text_chars,
)
