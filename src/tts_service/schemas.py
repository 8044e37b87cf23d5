"""Pydantic models at the HTTP boundary and between the front and the synthesizer service."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from tts_service.audio import AudioFormat

MAX_INSTRUCT_CHARS = 1000


Speaker = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
    Field(description="One of GET /v1/tts/speakers (case-insensitive).", examples=["Ryan"]),
]
Language = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=64),
    Field(description="One of GET /v1/tts/languages (case-insensitive); 'auto' detects it.", examples=["english"]),
]
Instruct = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=MAX_INSTRUCT_CHARS),
    Field(description="Optional natural-language style instruction (honoured by 1.7B CustomVoice models)."),
]

MAX_SEED = (1 << 63) - 1
SEED_DESCRIPTION = (
    "Optional integer 0 to 2^63-1: the same seed and input give the same audio, whoever else is speaking at "
    "the time. Without one, a random seed is used and returned in X-TTS-Seed."
)
# JSON bodies: a true integer (not true/false, not "42", not 4.0, not null), as the schema says; leave it
# out for a random seed (fields of this type default to None, which is never validated).
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED, description=SEED_DESCRIPTION)]
# Query strings are text: "42" is the integer 42 there.
QuerySeed = Annotated[int | None, Field(ge=0, le=MAX_SEED, description=SEED_DESCRIPTION)]
TEXT_DESCRIPTION = "Text to speak: 1 to TTS_MAX_TEXT_CHARS (GET /health: max_text_chars) characters after trimming."
StreamFormat = Literal["wav", "pcm"]
EXAMPLE = {"text": "Welcome to the gallery.", "speaker": "Ryan", "language": "english", "instruct": ""}


class SpeakFields(BaseModel):
    """The fields every plain synthesis route takes."""

    text: str = Field(description=TEXT_DESCRIPTION)
    speaker: Speaker
    language: Language = "auto"
    instruct: Instruct = ""
    seed: Seed = None


class SynthesizeRequest(SpeakFields):
    """Body of POST /v1/tts/synthesize."""

    model_config = ConfigDict(json_schema_extra={"example": {**EXAMPLE, "format": "wav"}})

    format: AudioFormat = Field(
        "wav", description="wav (16-bit PCM), flac, mp3, opus (Ogg), aac (ADTS) or pcm (raw s16le mono)."
    )


class StreamRequest(SpeakFields):
    """Body of POST /v1/tts/stream: the synthesize body, with `format` wav (default) or pcm."""

    model_config = ConfigDict(json_schema_extra={"example": {**EXAMPLE, "format": "wav"}})

    format: StreamFormat = Field("wav", description="wav: one header of unknown length, then PCM; pcm: raw s16le.")


class StreamQuery(StreamRequest):
    """GET /v1/tts/stream's query: the same fields, read from text."""

    seed: QuerySeed = None


class SynthesisJob(BaseModel):
    """One validated request as the front service hands it to the synthesizer's engine (the wire type
    between the two services); speaker and language are the loaded model's own names."""

    text: str
    speaker: str
    language: str = "auto"
    instruct: str = ""
    seed: int
    voice_id: str | None = None  # a saved voice (then `speaker` is its name, for logs and headers)
    # Ties the synthesizer's log lines to the client's error.
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])


class SynthesisOutcome(BaseModel):
    """A whole job's audio as 16-bit PCM (a failed job raises instead)."""

    pcm: bytes
    sample_rate: int
    num_samples: int
    frames: int
    truncated: bool
    batch_size: int


class SpeakerInfo(BaseModel):
    name: str
    description: str | None = None
    native_language: str | None = None


class ModelInfo(BaseModel):
    model: str
    speakers: list[SpeakerInfo]
    languages: list[str]
    sample_rate: int
    supports_instruct: bool
    clone_model: str | None = None  # TTS_CLONE_MODEL, when loaded
    design_model: str | None = None  # TTS_DESIGN_MODEL, when loaded

    @property
    def models(self) -> dict[str, str]:
        """Each loaded model kind and its model id."""
        loaded = {"custom_voice": self.model, "base": self.clone_model, "voice_design": self.design_model}
        return {kind: model for kind, model in loaded.items() if model}


VoiceKind = Literal["clone", "design"]
VOICE_NAME_DESCRIPTION = "1 to 64 characters, unique (case-insensitive); used as `speaker` or `voice` afterwards."
VoiceName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
    Field(description=VOICE_NAME_DESCRIPTION, examples=["harbour-master"]),
]


class VoiceInfo(BaseModel):
    """A saved voice."""

    id: str = Field(examples=["voice_3f2a9c0d11e24b7a"])
    name: str = Field(examples=["harbour-master"])
    kind: VoiceKind
    description: str | None = Field(None, description="What a designed voice was made from.")
    transcript: str | None = Field(None, description="The transcript of a clone's reference audio, if given.")
    language: str
    created: int = Field(description="Unix time of creation.")
    speaks_with: Literal["base", "voice_design"] = Field(description="The model kind that speaks this voice.")
    preview_url: str = Field(description="Its reference clip as WAV.")


class VoiceDesignRequest(BaseModel):
    """A voice designed from a description (JSON body of POST /v1/audio/voices)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "name": "harbour-master",
                "description": "An old harbour master: deep, gravelly, slow, a little amused.",
                "language": "english",
                "sample_text": "Ahoy there! Mind the ropes, the tide is coming in.",
            }
        },
    )

    name: VoiceName
    description: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_INSTRUCT_CHARS)]
    language: Language = "auto"
    sample_text: Annotated[str, StringConstraints(strip_whitespace=True, max_length=400)] = Field(
        "", description="The reference line the voice is designed with (a default sentence if empty)."
    )


class VoiceCreateJob(BaseModel):
    """A validated voice to create, front to synthesizer: a clone's decoded clip or a design's description."""

    name: str
    kind: VoiceKind
    language: str = "auto"
    text: str = ""  # the clone's transcript, or the design's description
    sample_text: str = ""
    pcm: bytes = b""  # a clone's reference clip: float32 little-endian mono
    sample_rate: int = 24_000


class VoiceReply(BaseModel):
    """The synthesizer's answer about one voice: the voice, or why not (status, field, message)."""

    voice: VoiceInfo | None = None
    status: int = 200
    field: str | None = None
    message: str = ""


class VoicePreview(BaseModel):
    status: int = 200
    message: str = ""
    wav: bytes = b""


class HealthResponse(BaseModel):
    """Also what a client needs to build its form: the text limit and whether instruct is honoured."""

    status: Literal["ok", "unavailable"]
    model_loaded: bool
    model: str
    max_text_chars: int
    supports_instruct: bool | None = None
    sample_rate: int | None = None
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Each loaded model kind and its id: custom_voice (TTS_MODEL), base (TTS_CLONE_MODEL: "
        "cloning), voice_design (TTS_DESIGN_MODEL: designing).",
    )


class SpeakersResponse(BaseModel):
    speakers: list[str] = Field(examples=[["Aiden", "Dylan", "Eric", "Ono_Anna", "Ryan"]])
    details: list[SpeakerInfo]


class LanguagesResponse(BaseModel):
    languages: list[str] = Field(examples=[["auto", "chinese", "english"]])


class ErrorDetail(BaseModel):
    loc: list[str]
    msg: str
    type: str
    allowed: list[str] | None = None


class ErrorResponse(BaseModel):
    """Every plain route's error body (errors.py builds it); the shape of BentoML's own errors."""

    error: str
    detail: list[ErrorDetail] = []
