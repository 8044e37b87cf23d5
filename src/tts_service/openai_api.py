"""OpenAI's text-to-speech API (`POST /v1/audio/speech`) mapped onto this service's speakers.

Kept free of BentoML so the request rules (model names, voice table, error shape) are testable alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from tts_service.audio import MAX_SPEED, MIN_SPEED, AudioFormat
from tts_service.schemas import ModelInfo, Seed

MODEL_CREATED = 1767225600  # 2026-01-01: OpenAI's model objects carry a creation time


class VoiceRef(BaseModel):
    """OpenAI also accepts `{"id": ...}` for custom voices."""

    id: str = Field(min_length=1, max_length=64)


class SpeechRequest(BaseModel):
    """OpenAI's request body, plus `language` (an extension: 'auto' lets the model detect it)."""

    model: str = Field(min_length=1, max_length=256, examples=["tts-1"])
    input: str = Field(min_length=1, description="Text to speak.", examples=["Hello from the gallery."])
    voice: str | VoiceRef = Field(
        description="A speaker of GET /v1/audio/voices (case-insensitive) or an OpenAI voice name from the "
        "voice table (alloy, echo, nova, ...).",
        examples=["Ryan"],
    )
    response_format: AudioFormat = Field("mp3", description="Audio format; OpenAI's default is mp3.")
    speed: float = Field(1.0, ge=MIN_SPEED, le=MAX_SPEED, description="Tempo, pitch kept: 0.25 to 4.0.")
    instructions: str = Field("", max_length=1000, description="Tone and style instruction (1.7B models).")
    language: str = Field("auto", max_length=64, description="Extension: a language of GET /v1/tts/languages.")
    seed: Seed = None
    stream_format: Literal["audio", "sse"] = Field(
        "audio",
        description="'audio': bytes (streamed as generated for pcm and wav at speed 1 when set explicitly); "
        "'sse': speech.audio.delta events with base64 audio (pcm or wav), then speech.audio.done.",
    )

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class OpenAIError(Exception):
    """A 4xx answered in OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status_code: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status_code = status_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kinds = {429: "rate_limit_error", 401: "authentication_error"}
        kind = kinds.get(self.status_code, "invalid_request_error" if self.status_code < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = MODEL_CREATED
    owned_by: str = "qwen3-tts-service"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Voice(BaseModel):
    id: str
    name: str
    description: str | None = None
    native_language: str | None = None
    openai_aliases: list[str] = []


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Voice]


def served_model_names(model_id: str, aliases: Sequence[str]) -> list[str]:
    """The loaded model's id, its last path part (for repo ids and folders) and the configured aliases."""
    names = [model_id]
    short = model_id.rstrip("/").rsplit("/", 1)[-1]
    for name in (short, *aliases):
        if name and name not in names:
            names.append(name)
    return names


def check_model(requested: str, served: Sequence[str]) -> None:
    if requested.strip().lower() not in {name.lower() for name in served}:
        raise OpenAIError(
            f"model {requested!r} is not served here; use one of: {', '.join(served)}",
            param="model",
            code="model_not_found",
        )


def resolve_voice(voice: str, info: ModelInfo, voice_map: Mapping[str, str]) -> str:
    """A speaker name of the loaded model, from a speaker name or an OpenAI voice alias."""
    speakers = {s.name.lower(): s.name for s in info.speakers}
    key = voice.strip().lower()
    if key in speakers:
        return speakers[key]
    aliases = {alias.lower(): target for alias, target in voice_map.items()}
    if key in aliases and aliases[key].lower() in speakers:
        return speakers[aliases[key].lower()]
    usable = [s.name for s in info.speakers] + sorted(a for a, t in aliases.items() if t.lower() in speakers)
    raise OpenAIError(
        f"voice {voice!r} is not available; use one of: {', '.join(usable)}", param="voice", code="invalid_voice"
    )


def list_voices(info: ModelInfo, voice_map: Mapping[str, str]) -> VoiceList:
    aliases: dict[str, list[str]] = {}
    for alias, target in voice_map.items():
        aliases.setdefault(target.lower(), []).append(alias)
    return VoiceList(
        data=[
            Voice(
                id=s.name,
                name=s.name,
                description=s.description,
                native_language=s.native_language,
                openai_aliases=sorted(aliases.get(s.name.lower(), [])),
            )
            for s in info.speakers
        ]
    )


def validation_error(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """The first of pydantic's/FastAPI's errors, in OpenAI's shape, naming the field and allowed values."""
    if not errors:
        return OpenAIError("invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = loc[0] if loc else None
    message = str(first.get("msg", "invalid value"))
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type"):
        return OpenAIError(f"request body is not valid JSON: {message}", code="invalid_json")
    if kind == "model_attributes_type" or param is None:
        return OpenAIError(
            "request body must be a JSON object (Content-Type: application/json) with 'model', 'input' and 'voice'"
        )
    if param == "speed":
        message = f"{message}; allowed: {MIN_SPEED} to {MAX_SPEED}"
    elif param == "voice":
        message = "must be a voice name (a string) or an object with an 'id'"
    return OpenAIError(f"invalid '{param}': {message}", param=param, code=f"invalid_{param}")
