"""The one place a request becomes a job: each route's body, checked against the loaded model.

pydantic has already checked each field's type and form (errors.py answers its errors); what is left
needs the model or the settings: the text's length after trimming, the speaker or voice, the language.
A refusal names the field as the route's clients call it (`input`, `voice` on OpenAI's route).
A speaker or voice is a built-in speaker or a saved voice (by name or id, case-insensitive).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from tts_service.errors import ServiceError
from tts_service.openai_api import SpeechRequest, check_model, resolve_voice, served_model_names, usable_voices
from tts_service.schemas import ModelInfo, SpeakFields, SynthesisJob, VoiceInfo
from tts_service.settings import Settings

MODEL_SETTING = {"base": "TTS_CLONE_MODEL", "voice_design": "TTS_DESIGN_MODEL"}
SPEECH_PATHS = ("/v1/tts/synthesize", "/v1/tts/stream", "/v1/audio/speech")


class JobValidator:
    """Builds validated jobs for the loaded models (their speakers and languages), the saved voices
    (`voices`; a validator without them knows the built-in speakers only) and the settings."""

    def __init__(self, info: ModelInfo, settings: Settings, voices: Sequence[VoiceInfo] = ()) -> None:
        self.info = info
        self.settings = settings
        self.speakers = {s.name.lower(): s.name for s in info.speakers}
        self.voices = list(voices)
        self.saved = {key: v for v in voices for key in (v.name.lower(), v.id.lower())}

    def with_voices(self, voices: Sequence[VoiceInfo]) -> JobValidator:
        return JobValidator(self.info, self.settings, voices)

    def knows(self, name: str) -> bool:
        """Whether `name` is a built-in speaker or an OpenAI alias of one (no saved voices needed)."""
        key = name.strip().lower()
        aliases = {alias.lower() for alias in self.settings.openai_voice_map}
        return key in self.speakers or key in aliases

    def saved_voice(self, name: str, field: str) -> VoiceInfo | None:
        """The saved voice `name` names, if any; a 400 if the model that speaks it is not loaded."""
        voice = self.saved.get(name.strip().lower())
        if voice is not None and voice.speaks_with not in self.info.models:
            setting = MODEL_SETTING[voice.speaks_with]
            raise ServiceError.invalid(field, f"voice {voice.name!r} needs a model that is not loaded: set {setting}")
        return voice

    def text(self, text: str, field: str = "text") -> str:
        text = text.strip()
        limit = self.settings.max_text_chars
        if not text or len(text) > limit:
            raise ServiceError.invalid(
                field, f"must be 1 to {limit} characters after trimming whitespace, got {len(text)}"
            )
        return text

    def speaker_names(self) -> list[str]:
        return sorted(self.speakers.values()) + [v.name for v in self.voices]

    def model_names(self) -> list[str]:
        served = served_model_names(self.settings.model, self.settings.openai_model_aliases)
        return served + [m for m in self.info.models.values() if m not in served]

    def choices(self, field: str, path: str) -> list[str] | None:
        """The values a speech route's required `field` takes (None: not a field with a list), so that a
        request missing it is told them, as one with a wrong value is."""
        if path not in SPEECH_PATHS:
            return None
        openai = path == "/v1/audio/speech"
        if field == "speaker" and not openai:
            return self.speaker_names()
        if field == "voice" and openai:
            return usable_voices(self.info, self.settings.openai_voice_map, [v.name for v in self.voices])
        if field == "model" and openai:
            return self.model_names()
        return None

    def speaker(self, name: str) -> str:
        key = name.strip().lower()
        if key not in self.speakers:
            allowed = self.speaker_names()
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
        text = self.text(body.text)
        voice = self.saved_voice(body.speaker, "speaker")
        return SynthesisJob(
            text=text,
            speaker=voice.name if voice else self.speaker(body.speaker),
            language=self.language(body.language),
            instruct=body.instruct,
            seed=self.seed(body.seed),
            voice_id=voice.id if voice else None,
        )

    def speech_job(self, body: SpeechRequest) -> SynthesisJob:
        """A job from OpenAI's speech body: its model name, voice (speaker or alias) and `input`."""
        check_model(body.model, self.model_names())
        if body.stream_format == "sse" and not (body.response_format in ("pcm", "wav") and body.speed == 1.0):
            field = "response_format" if body.response_format not in ("pcm", "wav") else "speed"
            raise ServiceError.invalid(field, "stream_format 'sse' needs response_format 'pcm' or 'wav' and speed 1.0")
        text = self.text(body.input, "input")
        voice = self.saved_voice(body.voice_name, "voice")
        names = [v.name for v in self.voices]
        speaker = (
            voice.name if voice else resolve_voice(body.voice_name, self.info, self.settings.openai_voice_map, names)
        )
        return SynthesisJob(
            text=text,
            speaker=speaker,
            language=self.language(body.language),
            instruct=body.instructions.strip(),
            seed=self.seed(body.seed),
            voice_id=voice.id if voice else None,
        )
