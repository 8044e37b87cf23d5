"""Voices: OpenAI's `GET /v1/audio/voices` (built-in speakers and saved voices), and the saved-voice
library: create (a clone from an upload, or a design from a description), read, preview, delete.

The upload is decoded here, on the front, in a worker thread with a timeout (reference_audio.py), so a
bad file never reaches the GPU worker; the synthesizer gets a checked 24 kHz mono clip.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.datastructures import UploadFile

from tts_service.errors import ServiceError, openapi_errors
from tts_service.gateway import Gateway
from tts_service.openai_api import Voice, VoiceList, list_voices
from tts_service.reference_audio import FORMATS, MAX_SECONDS, MIN_SECONDS, ReferenceAudioError, decode_reference_async
from tts_service.routes import GatewayDep
from tts_service.schemas import Language, VoiceCreateJob, VoiceDesignRequest, VoiceInfo, VoiceName
from tts_service.validation import JobValidator

router = APIRouter(tags=["voices"])
VOICES = "/v1/audio/voices"
VoiceId = Annotated[str, Path(min_length=1, max_length=64, description="A voice's id or name.")]


class CloneForm(BaseModel):
    """The text fields of a clone's multipart form (the `audio` file is checked on its own)."""

    model_config = ConfigDict(extra="forbid")

    name: VoiceName
    transcript: Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)] = Field(
        "", description="What the clip says; without it, only the speaker embedding is cloned (x-vector mode)."
    )
    language: Language = "auto"


CREATE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "audio"],
                "properties": {
                    "name": {"type": "string", "maxLength": 64, "example": "harbour-master"},
                    "audio": {
                        "type": "string",
                        "format": "binary",
                        "description": f"{MIN_SECONDS:g} to {MAX_SECONDS:g} s of clear speech: {FORMATS}.",
                    },
                    "transcript": {"type": "string", "description": "What the clip says (better clones)."},
                    "language": {"type": "string", "example": "english"},
                },
            }
        },
        "application/json": {"schema": VoiceDesignRequest.model_json_schema()},
    },
}


def _check_new_name(name: str, validator: JobValidator) -> None:
    """Saved voices share `speaker` and `voice` with the built-in speakers and OpenAI's names."""
    if validator.knows(name):
        message = f"{name!r} is a built-in speaker or OpenAI voice name; choose another name"
        raise ServiceError.invalid("name", message)


def _need(info_models: dict[str, str], kind: str, what: str, setting: str) -> None:
    if kind not in info_models:
        raise ServiceError.invalid("model", f"{what} needs a model that is not loaded: set {setting}")


async def _clone_job(request: Request, gateway: Gateway) -> VoiceCreateJob:
    validator = await gateway.voice_validator()
    _need(validator.info.models, "base", "cloning a voice", "TTS_CLONE_MODEL")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # a malformed multipart body
        raise ServiceError.invalid("body", f"not a readable multipart/form-data body: {exc}") from None
    try:
        audio = form.get("audio")
        fields = {key: value for key, value in form.items() if key != "audio"}
        if any(not isinstance(value, str) for value in fields.values()):
            raise ServiceError.invalid("audio", "the only file field is 'audio'")
        try:
            body = CloneForm.model_validate(fields)
        except ValidationError as exc:
            raise ServiceError.from_validation(exc.errors(), openai=True) from None
        if not isinstance(audio, UploadFile):
            raise ServiceError.invalid("audio", f"a file field 'audio' is required ({FORMATS})")
        data = await audio.read()
    finally:
        await form.close()
    _check_new_name(body.name, validator)
    language = validator.language(body.language)
    try:
        clip = await decode_reference_async(data)
    except ReferenceAudioError as exc:
        raise ServiceError.invalid(exc.field, str(exc)) from None
    return VoiceCreateJob(
        name=body.name,
        kind="clone",
        language=language,
        text=body.transcript,
        pcm=clip.samples.astype("<f4").tobytes(),
        sample_rate=clip.sample_rate,
    )


async def _design_job(request: Request, gateway: Gateway) -> VoiceCreateJob:
    body = VoiceDesignRequest.model_validate_json(await request.body())  # the guard checked it already
    validator = await gateway.voice_validator()
    _need(validator.info.models, "voice_design", "designing a voice", "TTS_DESIGN_MODEL")
    _check_new_name(body.name, validator)
    return VoiceCreateJob(
        name=body.name,
        kind="design",
        language=validator.language(body.language),
        text=body.description,
        sample_text=body.sample_text,
    )


@router.get(VOICES, response_model=VoiceList, tags=["OpenAI-compatible"])
async def voices(gateway: GatewayDep) -> VoiceList:
    """Voices for /v1/audio/speech: the model's speakers (with the OpenAI names mapped to each), then the
    saved voices."""
    listed = list_voices(await gateway.model_info(), gateway.settings.openai_voice_map)
    for voice in await gateway.list_voices():
        listed.data.append(
            Voice(
                id=voice.id,
                name=voice.name,
                description=voice.description or voice.transcript,
                kind=voice.kind,
                language=voice.language,
                created=voice.created,
                preview_url=voice.preview_url,
            )
        )
    return listed


@router.post(
    VOICES,
    status_code=201,
    response_model=VoiceInfo,
    openapi_extra={"requestBody": CREATE_BODY},
    responses=openapi_errors((400, 409, 413, 415, 429, 503), openai=True),
)
async def create_voice(request: Request, gateway: GatewayDep) -> JSONResponse:
    """Save a voice. **multipart/form-data** (`name`, `audio`, optional `transcript` and `language`): clone
    the voice in the clip (needs TTS_CLONE_MODEL). **JSON** (`name`, `description`, optional `language` and
    `sample_text`): design a voice from the description (needs TTS_DESIGN_MODEL). Then speak with it by
    name or id as `speaker` or `voice`."""
    multipart = (request.headers.get("content-type") or "").lower().startswith("multipart/form-data")
    job = await (_clone_job(request, gateway) if multipart else _design_job(request, gateway))
    voice = await gateway.create_voice(job)
    return JSONResponse(voice.model_dump(), status_code=201, headers={"Location": f"{VOICES}/{voice.id}"})


@router.get(f"{VOICES}/{{voice_id}}", response_model=VoiceInfo, responses=openapi_errors((400, 404), openai=True))
async def get_voice(voice_id: VoiceId, gateway: GatewayDep) -> VoiceInfo:
    """One saved voice, by id or name."""
    return await gateway.find_voice(voice_id)


@router.get(
    f"{VOICES}/{{voice_id}}/preview",
    response_class=Response,
    responses={200: {"content": {"audio/wav": {}}}, **openapi_errors((400, 404), openai=True)},
)
async def preview_voice(voice_id: VoiceId, gateway: GatewayDep) -> Response:
    """The voice's reference clip as WAV: the uploaded clip of a clone, the designed line of a design."""
    voice = await gateway.find_voice(voice_id)
    return Response(await gateway.voice_preview(voice.id), media_type="audio/wav")


@router.delete(f"{VOICES}/{{voice_id}}", response_model=VoiceInfo, responses=openapi_errors((400, 404), openai=True))
async def delete_voice(voice_id: VoiceId, gateway: GatewayDep) -> VoiceInfo:
    """Delete a saved voice and its files; returns what was deleted."""
    return await gateway.delete_voice(voice_id)
