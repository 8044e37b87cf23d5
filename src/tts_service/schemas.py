"""Pydantic models at the HTTP boundary and between the front and the synthesizer service."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictInt, StringConstraints

MAX_INSTRUCT_CHARS = 1000


def text_type(max_chars: int) -> Any:
    """The `text` field's type; its limit is configuration, hence built at start-up."""
    return Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=max_chars),
        Field(
            description=f"Text to speak: 1 to {max_chars} characters after trimming whitespace.",
            examples=["Hello! Welcome to the virtual gallery."],
        ),
    ]


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
    Field(
        description="Optional natural-language style instruction (honoured by 1.7B CustomVoice models).",
        examples=["Speak warmly and a little slower."],
    ),
]

MAX_SEED = (1 << 63) - 1
SEED_DESCRIPTION = (
    "Optional integer 0 to 2^63-1: the same seed and input give the same audio, whoever else is speaking at "
    "the time. Without one, a random seed is used and returned in X-TTS-Seed."
)
# JSON bodies: a true integer (not true/false, not "42", not 4.0, not null), as the schema says; leave it
# out for a random seed (fields of this type default to None, which is never validated).
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED, description=SEED_DESCRIPTION, examples=[42])]
# Query strings are text: "42" is the integer 42 there.
QuerySeed = Annotated[int | None, Field(ge=0, le=MAX_SEED, description=SEED_DESCRIPTION, examples=[42])]


class SynthesisJob(BaseModel):
    """One request as the front service hands it to the synthesizer's engine."""

    text: str
    speaker: str
    language: str = "auto"
    instruct: str = ""
    seed: int | None = None
    # Ties the synthesizer's log lines to the client's error.
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])


class SynthesisOutcome(BaseModel):
    """A job's audio as 16-bit PCM, or the reason it was refused."""

    pcm: bytes | None = None
    sample_rate: int = 0
    num_samples: int = 0
    frames: int = 0
    truncated: bool = False
    batch_size: int = 0
    error_field: str | None = None  # "internal" when generation itself failed (a 500, not the client's fault)
    error: str | None = None
    allowed: list[str] = []


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


class HealthResponse(BaseModel):
    """Also what a client needs to build its form: the text limit and whether instruct is honoured."""

    status: Literal["ok", "unavailable"]
    model_loaded: bool
    model: str
    max_text_chars: int
    supports_instruct: bool | None = None
    sample_rate: int | None = None


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
    """Same shape as BentoML's own validation errors, so clients parse one format."""

    error: str
    detail: list[ErrorDetail] = []
