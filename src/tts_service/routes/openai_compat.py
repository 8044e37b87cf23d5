"""OpenAI's speech API, unchanged for the `openai` SDKs: `/v1/audio/speech`, `/v1/models`, `/v1/audio/voices`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from tts_service.audio import CONTENT_TYPES
from tts_service.audio_responses import file_response, stream_response
from tts_service.errors import openapi_errors
from tts_service.openai_api import ModelCard, ModelList, SpeechRequest, VoiceList, list_voices, served_model_names
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
    job = (await gateway.validator()).speech_job(body)
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
    """OpenAI's model list: the loaded model and the names accepted for it."""
    settings = gateway.settings
    return ModelList(data=[ModelCard(id=n) for n in served_model_names(settings.model, settings.openai_model_aliases)])


@router.get("/v1/audio/voices", response_model=VoiceList)
async def voices(gateway: GatewayDep) -> VoiceList:
    """Voices for /v1/audio/speech: the model's speakers and the OpenAI names mapped to each."""
    return list_voices(await gateway.model_info(), gateway.settings.openai_voice_map)
