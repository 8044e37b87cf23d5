"""The one place a request becomes a job: each route's body, checked against the loaded model.

pydantic has already checked each field's type and form (errors.py answers its errors); what is left
needs the model or the settings: the text's length after trimming, the speaker or voice, the language.
A refusal names the field as the route's clients call it (`input`, `voice` on OpenAI's route).
"""

from __future__ import annotations

import secrets

from tts_service.errors import ServiceError
from tts_service.openai_api import SpeechRequest, check_model, resolve_voice, served_model_names
from tts_service.schemas import ModelInfo, SpeakFields, SynthesisJob
from tts_service.settings import Settings


class JobValidator:
    """Builds validated jobs for the loaded model (its speakers and languages) and the settings."""

    def __init__(self, info: ModelInfo, settings: Settings) -> None:
        self.info = info
        self.settings = settings
        self.speakers = {s.name.lower(): s.name for s in info.speakers}

    def text(self, text: str, field: str = "text") -> str:
        text = text.strip()
        limit = self.settings.max_text_chars
        if not text or len(text) > limit:
            raise ServiceError.invalid(
                field, f"must be 1 to {limit} characters after trimming whitespace, got {len(text)}"
            )
        return text

    def speaker(self, name: str) -> str:
        key = name.strip().lower()
        if key not in self.speakers:
            allowed = sorted(self.speakers.values())
            raise ServiceError.invalid("speaker", f"unknown speaker {name!r}; allowed: {', '.join(allowed)}", allowed)
        return self.speakers[key]

    def language(self, name: str | None) -> str:
        key = (name or "auto").strip().lower() or "auto"
        if key not in self.info.languages:
            allowed = self.info.languages
            raise ServiceError.invalid("language", f"unknown language {name!r}; allowed: {', '.join(allowed)}", allowed)
        return key

    @staticmethod
    def seed(seed: int | None) -> int:
        """Fixed here, so that the client can be told it (X-TTS-Seed) and replay the line."""
        return secrets.randbits(63) if seed is None else seed

    def job(self, body: SpeakFields) -> SynthesisJob:
        """A job from the plain routes' fields (synthesize, and the stream's body or query)."""
        return SynthesisJob(
            text=self.text(body.text),
            speaker=self.speaker(body.speaker),
            language=self.language(body.language),
            instruct=body.instruct,
            seed=self.seed(body.seed),
        )

    def speech_job(self, body: SpeechRequest) -> SynthesisJob:
        """A job from OpenAI's speech body: its model name, voice (speaker or alias) and `input`."""
        check_model(body.model, served_model_names(self.settings.model, self.settings.openai_model_aliases))
        if body.stream_format == "sse" and not (body.response_format in ("pcm", "wav") and body.speed == 1.0):
            field = "response_format" if body.response_format not in ("pcm", "wav") else "speed"
            raise ServiceError.invalid(field, "stream_format 'sse' needs response_format 'pcm' or 'wav' and speed 1.0")
        text = self.text(body.input, "input")
        speaker = resolve_voice(body.voice_name, self.info, self.settings.openai_voice_map)
        return SynthesisJob(
            text=text,
            speaker=speaker,
            language=self.language(body.language),
            instruct=body.instructions.strip(),
            seed=self.seed(body.seed),
        )
