"""What a client needs before it speaks: health, speakers and languages."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tts_service.routes import GatewayDep
from tts_service.schemas import HealthResponse, LanguagesResponse, SpeakersResponse

router = APIRouter(tags=["service information"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(gateway: GatewayDep) -> HealthResponse | JSONResponse:
    """Whether the model is loaded and the synthesizer answers, and the limits a client's form needs."""
    settings = gateway.settings
    info = await gateway.ready_info()
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
        models=info.models,
    )


@router.get("/v1/tts/speakers", response_model=SpeakersResponse)
async def speakers(gateway: GatewayDep) -> SpeakersResponse:
    """The loaded model's speakers, with description and native language where known."""
    info = await gateway.model_info()
    return SpeakersResponse(speakers=[s.name for s in info.speakers], details=info.speakers)


@router.get("/v1/tts/languages", response_model=LanguagesResponse)
async def languages(gateway: GatewayDep) -> LanguagesResponse:
    """The loaded model's languages; 'auto' lets the model detect it."""
    return LanguagesResponse(languages=(await gateway.model_info()).languages)
