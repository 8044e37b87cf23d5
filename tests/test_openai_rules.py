"""The OpenAI endpoint's request rules, without a server: model names, voices, error shape, settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tts_service.errors import ServiceError
from tts_service.openai_api import SpeechRequest, check_model, list_voices, resolve_voice, served_model_names
from tts_service.schemas import ModelInfo, SpeakerInfo
from tts_service.settings import DEFAULT_VOICE_MAP, Settings

INFO = ModelInfo(
    model="Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice",
    speakers=[SpeakerInfo(name=n) for n in ["Aiden", "Ryan", "Uncle_Fu", "Vivian"]],
    languages=["auto", "english"],
    sample_rate=24000,
    supports_instruct=True,
)


def test_served_names_are_the_id_its_short_name_and_aliases() -> None:
    names = served_model_names("Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice", ["tts-1", "tts-1"])
    assert names == ["Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice", "Qwen3-TTS-12Hz-1.7B-CustomVoice", "tts-1"]
    check_model("TTS-1", names)  # case-insensitive
    with pytest.raises(ServiceError) as caught:
        check_model("gpt-5", names)
    error = caught.value.openai_body()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "Qwen3-TTS-12Hz-1.7B-CustomVoice" in error["message"]


def test_voices_resolve_by_speaker_name_or_openai_alias() -> None:
    assert resolve_voice("uncle_fu", INFO, DEFAULT_VOICE_MAP) == "Uncle_Fu"
    assert resolve_voice("ALLOY", INFO, DEFAULT_VOICE_MAP) == "Vivian"
    assert resolve_voice("onyx", INFO, DEFAULT_VOICE_MAP) == "Uncle_Fu"
    with pytest.raises(ServiceError) as caught:
        resolve_voice("shimmer", INFO, DEFAULT_VOICE_MAP)  # maps to Ono_Anna, which this model lacks
    error = caught.value.openai_body()["error"]
    assert error["param"] == "voice" and error["type"] == "invalid_request_error"
    assert "Ryan" in error["message"] and "alloy" in error["message"] and "shimmer" not in error["message"][20:]


def test_voice_list_names_the_aliases_of_each_speaker() -> None:
    voices = {v.id: v.openai_aliases for v in list_voices(INFO, DEFAULT_VOICE_MAP).data}
    assert voices["Vivian"] == ["alloy", "marin"]
    assert voices["Uncle_Fu"] == ["cedar", "onyx"]


def test_request_defaults_follow_openai() -> None:
    request = SpeechRequest(model="tts-1", input="hi", voice={"id": "Ryan"})
    assert (request.response_format, request.speed, request.voice_name) == ("mp3", 1.0, "Ryan")


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"speed": 4.5}, "speed", "0.25 to 4.0"),
        ({"response_format": "ogg"}, "response_format", "'wav', 'flac', 'mp3', 'opus', 'aac' or 'pcm'"),
        ({"voice": 3}, "voice", "voice name"),
        ({"input": None}, "input", "input"),
    ],
)
def test_validation_errors_name_the_param(body: dict, param: str, needle: str) -> None:
    with pytest.raises(ValidationError) as caught:
        SpeechRequest.model_validate({"model": "tts-1", "input": "hi", "voice": "Ryan", **body})
    error = ServiceError.from_validation(caught.value.errors(), openai=True)
    body = error.openai_body()["error"]
    assert body["param"] == param and needle in body["message"] and error.status == 400


def test_voice_map_and_aliases_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTS_OPENAI_VOICE_MAP", "Alloy=Ryan, echo=Vivian")
    monkeypatch.setenv("TTS_OPENAI_MODEL_ALIASES", "tts-1, my-tts")
    settings = Settings()
    assert settings.openai_voice_map == {"alloy": "Ryan", "echo": "Vivian"}
    assert settings.openai_model_aliases == ["tts-1", "my-tts"]
    monkeypatch.setenv("TTS_OPENAI_VOICE_MAP", '{"nova": "Aiden"}')
    assert Settings().openai_voice_map == {"nova": "Aiden"}
    monkeypatch.setenv("TTS_OPENAI_VOICE_MAP", "alloy")
    with pytest.raises(ValidationError, match="voice=Speaker"):
        Settings()
