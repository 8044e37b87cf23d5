"""The plain TTS API's streams: `POST /v1/tts/stream` and `GET /v1/tts/stream` (for `<audio src>`).

`POST /v1/tts/synthesize`, the whole-file route, is the service's own `@bentoml.api` (service.py); it
calls `synthesize_file` below, so both take the same way through validation and the gateway.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from tts_service.audio_responses import file_response, stream_response
from tts_service.errors import openapi_errors
from tts_service.gateway import Gateway
from tts_service.routes import GatewayDep
from tts_service.schemas import SpeakFields, StreamQuery, StreamRequest, SynthesizeRequest

router = APIRouter(tags=["streaming"])
STREAM_RESPONSES = {
    200: {"content": {"audio/wav": {}, "audio/pcm": {}}, "description": "Audio as it is generated."},
    **openapi_errors((400, 429, 500), openai=False),
}


async def synthesize_file(gateway: Gateway, body: SynthesizeRequest) -> Response:
    """A whole file: validate, synthesize through the gateway, encode in the asked-for format."""
    job = (await gateway.validator_for(body.speaker)).job(body)
    outcome = await gateway.synthesize(job, "/v1/tts/synthesize")
    return await file_response(job, outcome, body.format)


async def _stream(gateway: Gateway, body: SpeakFields, fmt: str) -> StreamingResponse:
    job = (await gateway.validator_for(body.speaker)).job(body)
    stream = await gateway.open_stream(job)
    info = await gateway.model_info()
    return stream_response(job, stream, fmt, "/v1/tts/stream", info.sample_rate)


@router.post("/v1/tts/stream", response_class=StreamingResponse, responses=STREAM_RESPONSES)
async def stream(body: StreamRequest, gateway: GatewayDep) -> StreamingResponse:
    """Speak `text` as a stream: audio starts after the first few frames instead of after the whole text.
    `wav`: one RIFF header with unknown sizes, then 16-bit PCM; `pcm`: raw s16le mono at 24 kHz."""
    return await _stream(gateway, body, body.format)


@router.get("/v1/tts/stream", response_class=StreamingResponse, responses=STREAM_RESPONSES)
async def stream_get(query: Annotated[StreamQuery, Query()], gateway: GatewayDep) -> StreamingResponse:
    """The same stream for a URL: `<audio src="/v1/tts/stream?text=Hello&speaker=Ryan">` plays as it
    arrives in browsers (a browser's audio element can only GET)."""
    return await _stream(gateway, query, query.format)
