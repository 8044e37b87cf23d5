"""OpenAI's speech API, unchanged for the `openai` SDKs: `/v1/audio/speech` and `/v1/models` (the voices
are in routes/voices.py)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from tts_service.audio import CONTENT_TYPES
from tts_service.audio_responses import file_response, stream_response
from tts_service.errors import openapi_errors
from tts_service.openai_api import ModelCard, ModelList, SpeechRequest, served_model_names
from tts_service.routes import GatewayDep

router = APIRouter(tags=["OpenAI-compatible"])
SPEECH_RESPONSES = {
    200: {"content": {ct: {} for ct in CONTENT_TYPES.values()}, "description": "The audio file or stream."},
    **openapi_errors((400, 429, 500), openai=True),
}


@router.post("/v1/audio/speech", response_class=Response, responses=SPEECH_RESPONSES)
async def speech(body: SpeechRequest, gateway: GatewayDep) -> Response:
    """OpenAI-compatible text to speech: the `openai` SDKs and their users call this unchanged.
    Streamed when asked for: `stream_format` "sse", or "audio" set explicitly for pcm or wav at speed 1."""
    job = (await gateway.validator_for(body.voice_name)).speech_job(body)
    streamable = body.response_format in ("pcm", "wav") and body.speed == 1.0
    if body.stream_format == "sse" or (streamable and "stream_format" in body.model_fields_set):
        stream = await gateway.open_stream(job)
        fmt = "wav" if body.response_format == "wav" else "pcm"
        sample_rate = (await gateway.model_info()).sample_rate
        route = "/v1/audio/speech:" + body.stream_format
        return stream_response(job, stream, fmt, route, sample_rate, sse=body.stream_format == "sse")
    outcome = await gateway.synthesize(job, "/v1/audio/speech")
    return await file_response(job, outcome, body.response_format, body.speed)


@router.get("/v1/models", response_model=ModelList)
async def models(gateway: GatewayDep) -> ModelList:
    """OpenAI's model list: the loaded model and the names accepted for it, then the clone and design
    models when loaded (`kind` says which is which)."""
    settings = gateway.settings
    cards = [ModelCard(id=n) for n in served_model_names(settings.model, settings.openai_model_aliases)]
    info = await gateway.ready_info()
    for kind, model_id in (info.models if info else {}).items():
        if kind != "custom_voice":
            cards.append(ModelCard(id=model_id, kind=kind))
    return ModelList(data=cards)
