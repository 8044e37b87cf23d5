"""OpenAI's text-to-speech API (`POST /v1/audio/speech`) mapped onto this service's speakers.

Kept free of BentoML so the request rules (model names, voice table, error shape) are testable alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tts_service.audio import MAX_SPEED, MIN_SPEED, AudioFormat
from tts_service.errors import Problem, ServiceError
from tts_service.schemas import ModelInfo, Seed

MODEL_CREATED = 1767225600  # 2026-01-01: OpenAI's model objects carry a creation time


class VoiceRef(BaseModel):
    """OpenAI also accepts `{"id": ...}` for custom voices."""

    id: str = Field(min_length=1, max_length=64)


class SpeechRequest(BaseModel):
    """OpenAI's request body, plus `language` (an extension: 'auto' lets the model detect it)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {"model": "tts-1", "input": "Hello from the gallery.", "voice": "Ryan", "response_format": "wav"}
        }
    )

    model: str = Field(min_length=1, max_length=256, description="tts-1, tts-1-hd, or the model id (GET /v1/models).")
    input: str = Field(min_length=1, description="Text to speak.")
    voice: str | VoiceRef = Field(
        description="A speaker of GET /v1/audio/voices (case-insensitive) or an OpenAI voice name from the "
        "voice table (alloy, echo, nova, ...).",
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
    kind: Literal["custom_voice", "voice_design", "base"] = "custom_voice"  # extension: the checkpoint kind


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Voice(BaseModel):
    id: str
    name: str
    description: str | None = None
    native_language: str | None = None
    openai_aliases: list[str] = []
    kind: Literal["builtin", "clone", "design"] = "builtin"
    language: str | None = None  # a saved voice's language
    created: int | None = None  # a saved voice's creation time (Unix)
    preview_url: str | None = None  # a saved voice's reference clip


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
        message = f"model {requested!r} is not served here; use one of: {', '.join(served)}"
        raise ServiceError(400, message, [Problem("model", message, "model_not_found", list(served))])


def usable_voices(info: ModelInfo, voice_map: Mapping[str, str], saved: Sequence[str] = ()) -> list[str]:
    """Every `voice` the speech route takes: the speakers, the aliases of loaded speakers, saved voices."""
    speakers = {s.name.lower() for s in info.speakers}
    aliases = sorted(alias.lower() for alias, target in voice_map.items() if target.lower() in speakers)
    return [s.name for s in info.speakers] + aliases + list(saved)


def resolve_voice(voice: str, info: ModelInfo, voice_map: Mapping[str, str], saved: Sequence[str] = ()) -> str:
    """A speaker name of the loaded model, from a speaker name or an OpenAI voice alias (`saved`: the
    saved voices' names, for the refusal's list)."""
    speakers = {s.name.lower(): s.name for s in info.speakers}
    key = voice.strip().lower()
    if key in speakers:
        return speakers[key]
    aliases = {alias.lower(): target for alias, target in voice_map.items()}
    if key in aliases and aliases[key].lower() in speakers:
        return speakers[aliases[key].lower()]
    usable = usable_voices(info, voice_map, saved)
    raise ServiceError.invalid("voice", f"{voice!r} is not available; use one of: {', '.join(usable)}", usable)


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
