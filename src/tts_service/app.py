"""The front service's FastAPI app: its routers, its one set of error handlers, and its docs' text."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI

from tts_service.errors import Choices, install_error_handlers
from tts_service.routes import info, openai_compat, tts, voices

logger = logging.getLogger(__name__)

TITLE = "Qwen3-TTS service"
DESCRIPTION = """Text to speech with [Qwen3-TTS](https://github.com/QwenLM/Qwen3-TTS) CustomVoice: 9 speakers,
10 languages plus `auto`, and natural-language style instructions. Concurrent requests share every
decode step on the GPU; audio streams as it is generated.

**Quick start**: open `POST /v1/tts/synthesize` below, press *Try it out*, then *Execute*, and play the
WAV it returns. From a shell:

    curl -s -X POST http://HOST:8000/v1/tts/synthesize -H 'Content-Type: application/json' \\
      -d '{"text": "Welcome to the gallery.", "speaker": "Ryan"}' -o hello.wav

`GET /v1/tts/speakers` and `GET /v1/tts/languages` list the allowed values; `GET /health` says whether
the model is loaded. OpenAI's SDKs work unchanged against `/v1/audio/speech`."""
TAGS = [
    {"name": "speech", "description": "A whole audio file per request, in WAV or another format."},
    {"name": "streaming", "description": "Audio as it is generated: WAV of unknown length, or raw PCM."},
    {"name": "OpenAI-compatible", "description": "OpenAI's speech API, for the `openai` SDKs."},
    {"name": "voices", "description": "Saved voices: clone one from a recording, or design one from a description."},
    {"name": "service information", "description": "Health, speakers, languages."},
    {"name": "infrastructure", "description": "Liveness, readiness and Prometheus metrics (BentoML's)."},
]


def field_choices(app: FastAPI) -> Choices:
    """The values a speech route's required field takes, from the loaded model and the saved voices (for
    the refusal of a request that lacks it). None while the service has no model to ask."""

    async def choices(field: str, path: str) -> Sequence[str] | None:
        gateway = getattr(app.state, "gateway", None)  # set by the service once it is constructed
        if gateway is None:
            return None
        try:
            return (await gateway.voice_validator()).choices(field, path)
        except Exception:  # noqa: BLE001 - the model is not up: the refusal goes out without the list
            logger.debug("no choices for %s on %s", field, path, exc_info=True)
            return None

    return choices


def build_app() -> FastAPI:
    app = FastAPI(title=TITLE, description=DESCRIPTION, openapi_tags=TAGS)
    for router in (tts.router, openai_compat.router, voices.router, info.router):
        app.include_router(router)
    install_error_handlers(app, field_choices(app))
    return app
