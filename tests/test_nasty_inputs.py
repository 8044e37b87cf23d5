"""Hostile and odd inputs on the live server: each gets a 2xx with valid audio or a clear 4xx, never a 5xx,
and nothing in a request can make the server read a path or fetch a URL."""

from __future__ import annotations

import inspect
import io

import httpx
import pytest
import soundfile as sf

from tests.conftest import REPO_ROOT

SYNTH = "/v1/tts/synthesize"
SPEECH = "/v1/audio/speech"

NASTY_TEXTS = {
    "only punctuation": "?!... ,;: --- !!!",
    "emoji": "Hello 👋🏽 world 🌍🚀 🎉",
    "mixed scripts": "Hello 你好 こんにちは 안녕하세요 Привет مرحبا",
    "control characters": "line one\nline two\ttabbed\r\n\x0b\x0c bell\x07 escape\x1b[31m",
    "NUL": "before\x00after",
    "RTL with marks": "\u202eשלום עולם\u202c مرحبا بالعالم",
    "one very long word": "a" * 290,
    "SSML-like tags": '<speak><prosody rate="x-slow">Hi</prosody><break time="3s"/></speak>',
    "numbers": "3.14159 1,000,000 -42 0x1F 1e-9 12:30 2026-11-22",
    "path as text": "../../etc/passwd and C:\\Windows\\system32",
    "URL as text": "https://example.com/voice.wav file:///etc/shadow",
    "zero-width": "zero\u200bwidth\u200djoiners\ufeff",
    "combining marks": "Z̴̡̛a̸̧l̷g̶o̵ t̸e̶x̷t̵",
    "lone surrogate escape": "\\ud800 as literal text",
}


def assert_audio(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    info = sf.info(io.BytesIO(response.content))
    assert info.samplerate == 24000 and info.frames > 0


@pytest.mark.parametrize("name", list(NASTY_TEXTS))
def test_nasty_texts_are_spoken(client: httpx.Client, name: str) -> None:
    assert_audio(client.post(SYNTH, json={"text": NASTY_TEXTS[name], "speaker": "Ryan"}))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": "x" * 4097, "speaker": "Ryan"}, "text"),
        ({"text": "\u3000\u2003 \n\t", "speaker": "Ryan"}, "text"),  # only (Unicode) whitespace
        ({"text": "hi", "speaker": "../../etc/passwd"}, "speaker"),
        ({"text": "hi", "speaker": "/etc/passwd"}, "speaker"),
        ({"text": "hi", "speaker": "C:\\voices\\ryan.wav"}, "speaker"),
        ({"text": "hi", "speaker": "https://example.com/ryan.wav"}, "speaker"),
        ({"text": "hi", "speaker": "Ryan\x00"}, "speaker"),
        ({"text": "hi", "speaker": "Ryan", "language": "../english"}, "language"),
        ({"text": "hi", "speaker": "Ryan", "language": "x" * 65}, "language"),
        ({"text": "hi", "speaker": "Ryan", "instruct": "y" * 1001}, "instruct"),
        ({"text": "hi", "speaker": "Ryan", "format": "../../tmp/x"}, "format"),
        ({"text": ["a", "b"], "speaker": "Ryan"}, "text"),
        ({"text": "hi", "speaker": {"$ref": "/etc/passwd"}}, "speaker"),
    ],
)
def test_bad_fields_and_paths_get_400(client: httpx.Client, body: dict, field: str) -> None:
    response = client.post(SYNTH, json=body)
    assert response.status_code == 400, response.text
    assert field in response.text


@pytest.mark.parametrize("language", ["ENGLISH", "English", " english ", "AUTO", "Auto"])
def test_language_in_odd_cases(client: httpx.Client, language: str) -> None:
    assert_audio(client.post(SYNTH, json={"text": "Case test.", "speaker": "Ryan", "language": language}))


@pytest.mark.parametrize("voice", ["/etc/passwd", "file:///etc/passwd", "https://example.com/v.wav", "..\\ryan"])
def test_openai_voice_cannot_name_a_file_or_url(client: httpx.Client, voice: str) -> None:
    response = client.post(SPEECH, json={"model": "tts-1", "voice": voice, "input": "hi"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "voice"


def test_huge_json_gets_413_and_json_bombs_do_not_hurt(client: httpx.Client) -> None:
    huge = client.post(
        SYNTH,
        content=b'{"text": "' + b"z" * 2_000_000 + b'", "speaker": "Ryan"}',
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413
    deep = client.post(SYNTH, content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"})
    assert 400 <= deep.status_code < 500
    assert_audio(client.post(SYNTH, json={"text": "Still fine.", "speaker": "Ryan"}))


def test_only_decoded_samples_can_reach_qwen_tts_as_reference_audio() -> None:
    """qwen-tts accepts paths, URLs and base64 strings as reference audio; only voice_prompt.py hands it
    reference audio, always as samples the front decoded (test_voice_clone checks the call itself), and
    nothing else here calls qwen-tts's own generate functions."""
    from tts_service import engine, engine_host, prompt, scheduler, voice_catalog, voice_prompt

    assert "ref_audio=(np.asarray(audio, dtype=np.float32), int(sample_rate))" in inspect.getsource(voice_prompt)
    for module in (engine, prompt, scheduler, voice_catalog, engine_host):
        source = inspect.getsource(module)
        for call in ("generate_voice_clone(", "ref_audio", "create_voice_clone_prompt", "generate_voice_design("):
            assert call not in source, (module.__name__, call)
    assert "ref_audio" not in (REPO_ROOT / "service.py").read_text()
