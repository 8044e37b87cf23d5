"""Saved voices on the synthesizer's side: making them with the clone and design models, keeping them in
the voice library, and turning one into the prompt a request speaks with.

A clone keeps qwen-tts's clone prompt (prompt.safetensors) and the reference clip (reference.wav, its
preview). A designed voice has VoiceDesign speak a reference line from the description; with a clone
model loaded, that line is cloned at once, so every later line has the same voice; without one, later
lines are designed afresh from the description (the same kind of voice, not the same voice).
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass

import numpy as np

from tts_service.engine import SynthesisError, SynthesisRequest, TTSEngine
from tts_service.voice_library import StoredVoice, VoiceLibrary
from tts_service.voice_prompt import VoicePrompt

logger = logging.getLogger(__name__)

PROMPT_FILE, REFERENCE_FILE = "prompt.safetensors", "reference.wav"
# What a designed voice says for its reference line when the client gives no sample text.
DEFAULT_SAMPLE_TEXT = "Hello! This is my voice. I hope you like the way it sounds."


class VoiceUnavailable(RuntimeError):
    """The model a voice needs is not loaded; the message names the setting that loads it."""


@dataclass(frozen=True)
class Speaking:
    """How a saved voice speaks one request: which engine, with which prompt or instruction."""

    engine: TTSEngine
    voice: VoicePrompt | None
    instruct: str
    language: str


class VoiceCatalog:
    def __init__(self, library: VoiceLibrary, clone: TTSEngine | None, design: TTSEngine | None) -> None:
        self.library = library
        self.clone_engine = clone
        self.design_engine = design
        self._prompts: dict[str, VoicePrompt] = {}
        self._lock = threading.Lock()

    def _need_clone(self) -> TTSEngine:
        if self.clone_engine is None:
            raise VoiceUnavailable("cloning needs a Base model: set TTS_CLONE_MODEL")
        return self.clone_engine

    def create_clone(
        self, name: str, audio: np.ndarray, sample_rate: int, transcript: str, language: str
    ) -> StoredVoice:
        """Blocking (the speaker encoder and codec encoder run here)."""
        from tts_service.audio import encode_wav

        prompt = self._need_clone().clone_voice(audio, sample_rate, transcript)
        files = {PROMPT_FILE: prompt.to_bytes(), REFERENCE_FILE: encode_wav(audio, sample_rate)}
        return self.library.create(name, "clone", transcript.strip(), language, files)

    def create_design(self, name: str, description: str, language: str, sample_text: str) -> StoredVoice:
        """Blocking: VoiceDesign speaks the reference line (through its step engine, batched with whatever
        else it is speaking), then the clone model, if loaded, turns that line into the voice's prompt."""
        from tts_service.audio import encode_wav

        if self.design_engine is None:
            raise VoiceUnavailable("designing voices needs a VoiceDesign model: set TTS_DESIGN_MODEL")
        sample_text = sample_text.strip() or DEFAULT_SAMPLE_TEXT
        design = self.design_engine
        request = design.request_for(sample_text, "", language, description)
        result = design.synthesize(request, f"design-{name_slug(name)}-{secrets.token_hex(4)}")
        if result.num_samples == 0:
            raise SynthesisError("the VoiceDesign model produced no audio for the reference line")
        files = {REFERENCE_FILE: encode_wav(result.audio, result.sample_rate)}
        if self.clone_engine is not None:
            prompt = self.clone_engine.clone_voice(result.audio, result.sample_rate, sample_text)
            files[PROMPT_FILE] = prompt.to_bytes()
        return self.library.create(name, "design", description.strip(), language, files)

    def prompt(self, voice: StoredVoice) -> VoicePrompt:
        with self._lock:
            cached = self._prompts.get(voice.id)
        if cached is None:
            cached = VoicePrompt.from_bytes(self.library.file(voice, PROMPT_FILE).read_bytes())
            with self._lock:
                self._prompts[voice.id] = cached
        return cached

    def speaking(self, voice_id: str, language: str) -> Speaking:
        """The engine and prompt for one request with a saved voice; 'auto' takes the voice's language."""
        voice = self.library.get(voice_id)
        if language == "auto":
            language = voice.language
        if PROMPT_FILE in voice.files:
            return Speaking(self._need_clone(), self.prompt(voice), "", language)
        if self.design_engine is None:  # a designed voice saved without a clone model
            raise VoiceUnavailable(f"voice {voice.name!r} is designed from its description: set TTS_DESIGN_MODEL")
        return Speaking(self.design_engine, None, voice.text, language)

    def needs(self, voice: StoredVoice) -> str:
        """The model kind that speaks this voice."""
        return "base" if PROMPT_FILE in voice.files else "voice_design"

    def preview(self, voice_id: str) -> bytes:
        voice = self.library.get(voice_id)
        return self.library.file(voice, REFERENCE_FILE).read_bytes()

    def delete(self, voice_id: str) -> StoredVoice:
        voice = self.library.delete(voice_id)
        with self._lock:
            self._prompts.pop(voice.id, None)
        return voice

    def request(self, speaking: Speaking, text: str, seed: int) -> SynthesisRequest:
        return speaking.engine.request_for(text, "", speaking.language, speaking.instruct, seed, speaking.voice)


def name_slug(name: str) -> str:
    """For request ids in logs only."""
    return "".join(ch for ch in name.lower() if ch.isalnum())[:24] or "voice"
