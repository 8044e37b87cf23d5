"""The unmodified `openai` Python client against a real `bentoml serve` on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.conftest import LiveServer
from tests.test_audio_formats import decode
from tts_service.audio import AUDIO_FORMATS, CONTENT_TYPES

TEXT = "The gallery opens at nine, and the east wing is closed today."


@pytest.fixture()
def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="any-key", max_retries=0, timeout=120)


def speech(oai: openai.OpenAI, **overrides) -> openai._legacy_response.HttpxBinaryResponseContent:
    args = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "wav", **overrides}
    return oai.audio.speech.create(**args)


@pytest.fixture(scope="module")
def reference_wav(server: LiveServer) -> tuple[np.ndarray, int]:
    """The greedy WAV for TEXT from /v1/tts/synthesize with the speaker that `alloy` maps to."""
    response = httpx.post(f"{server.url}/v1/tts/synthesize", json={"text": TEXT, "speaker": "Vivian"}, timeout=120)
    assert response.status_code == 200, response.text
    samples, rate = sf.read(io.BytesIO(response.content), dtype="int16")
    return samples, rate


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_every_format_through_the_openai_client(
    oai: openai.OpenAI, reference_wav: tuple[np.ndarray, int], fmt: str
) -> None:
    result = speech(oai, response_format=fmt)
    assert result.response.headers["content-type"] == CONTENT_TYPES[fmt]
    samples, rate, channels = decode(result.content, fmt)
    reference, _ = reference_wav
    assert (rate, channels) == (24000, 1)
    assert len(samples) == pytest.approx(len(reference), abs=2048 if fmt == "aac" else 0)
    assert float(result.response.headers["x-tts-audio-seconds"]) == pytest.approx(len(reference) / 24000, abs=1e-3)
    if fmt in ("wav", "flac", "pcm"):  # lossless: the very samples of the plain endpoint
        assert np.array_equal(np.round(samples * 32768).astype(np.int16), reference)


def test_pcm_length_equals_the_wav_sample_count(oai: openai.OpenAI) -> None:
    wav = speech(oai, response_format="wav").content
    pcm = speech(oai, response_format="pcm").content
    assert len(pcm) == 2 * sf.info(io.BytesIO(wav)).frames
    assert wav[44:] == pcm


def test_speed_two_halves_the_duration(oai: openai.OpenAI) -> None:
    normal = sf.info(io.BytesIO(speech(oai, speed=1.0).content)).frames
    fast = sf.info(io.BytesIO(speech(oai, speed=2.0).content)).frames
    slow = sf.info(io.BytesIO(speech(oai, speed=0.5).content)).frames
    assert fast / normal == pytest.approx(0.5, abs=0.02)
    assert slow / normal == pytest.approx(2.0, abs=0.04)


def test_voice_names_case_insensitive_object_form_and_extensions(oai: openai.OpenAI) -> None:
    a = speech(oai, voice="RYAN").content
    b = speech(oai, voice={"id": "ryan"}).content
    assert a == b
    c = speech(oai, voice="Ryan", instructions="Whisper.", extra_body={"language": "English"})
    assert c.content[:4] == b"RIFF"
    assert speech(oai, model="tiny").content[:4] == b"RIFF"  # the loaded model's own id


@pytest.mark.parametrize(
    ("overrides", "param", "needle"),
    [
        ({"speed": 4.5}, "speed", "0.25 to 4.0"),
        ({"speed": 0.1}, "speed", "0.25 to 4.0"),
        ({"response_format": "ogg"}, "response_format", "'mp3'"),
        ({"voice": "nobody"}, "voice", "Vivian"),
        ({"voice": "../../etc/passwd"}, "voice", "alloy"),
        ({"model": "gpt-5"}, "model", "tiny, tts-1"),
        ({"input": "   "}, "input", "1 to 300 characters"),
        ({"input": "x" * 301}, "input", "1 to 300 characters"),
        ({"extra_body": {"language": "klingon"}}, "language", "english"),
        ({"stream_format": "sse", "response_format": "mp3"}, "response_format", "'pcm' or 'wav'"),
        ({"stream_format": "chunks"}, "stream_format", "'sse'"),
    ],
)
def test_invalid_requests_get_openai_shaped_400s(oai: openai.OpenAI, overrides: dict, param: str, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        speech(oai, **overrides)
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "needle"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (b"hello", "text/plain", 415, "Content-Type must be application/json, got text/plain"),
    ],
)
def test_malformed_bodies_get_openai_shaped_errors(
    server: LiveServer, content: bytes, content_type: str, status: int, needle: str
) -> None:
    response = httpx.post(
        f"{server.url}/v1/audio/speech", content=content, headers={"content-type": content_type}, timeout=30
    )
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


@pytest.mark.parametrize(("missing", "needle"), [("voice", "alloy"), ("model", "tiny, tts-1")])
def test_a_missing_voice_or_model_is_told_the_choices(server: LiveServer, missing: str, needle: str) -> None:
    body = {key: value for key, value in {"model": "tts-1", "input": TEXT, "voice": "alloy"}.items() if key != missing}
    response = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == missing and "required" in error["message"].lower() and needle in error["message"]


def test_streaming_helper(oai: openai.OpenAI) -> None:
    with oai.audio.speech.with_streaming_response.create(
        model="tts-1", voice="echo", input=TEXT, response_format="opus"
    ) as response:
        assert response.headers["content-type"] == "audio/ogg"
        data = b"".join(response.iter_bytes(512))
    samples, rate = sf.read(io.BytesIO(data))
    assert rate == 24000 and len(samples) > 0


def test_models_and_voices(oai: openai.OpenAI, server: LiveServer) -> None:
    assert [m.id for m in oai.models.list()] == ["tiny", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    voices = httpx.get(f"{server.url}/v1/audio/voices", timeout=30).json()["data"]
    assert len(voices) == 9
    by_id = {v["id"]: v for v in voices}
    assert by_id["Vivian"]["openai_aliases"] == ["alloy", "marin"]
    assert by_id["Ryan"]["native_language"] == "English"


def test_synthesize_endpoint_formats(server: LiveServer, reference_wav: tuple[np.ndarray, int]) -> None:
    for fmt in ("mp3", "pcm", "wav"):
        response = httpx.post(
            f"{server.url}/v1/tts/synthesize", json={"text": TEXT, "speaker": "vivian", "format": fmt}, timeout=120
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == CONTENT_TYPES[fmt]
        samples, rate, _ = decode(response.content, fmt)
        assert rate == 24000 and len(samples) == len(reference_wav[0])
    bad = httpx.post(f"{server.url}/v1/tts/synthesize", json={"text": "hi", "speaker": "Ryan", "format": "mp4"})
    assert bad.status_code == 400 and bad.json()["detail"][0]["loc"] == ["format"]


def test_openai_and_plain_requests_share_one_batcher(server: LiveServer) -> None:
    """One OpenAI request joins a queue of plain ones; a batch larger than 1 can then only be mixed."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for i in range(12):  # past BentoML's one-at-a-time calibration
            assert http.post("/v1/tts/synthesize", json={"text": f"Warm {i}.", "speaker": "Ryan"}).status_code == 200
        assert http.get("/v1/audio/voices").status_code == 200  # caches the model info the speech route reads

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            plain = [
                asyncio.create_task(http.post("/v1/tts/synthesize", json={"text": f"Plain {i}.", "speaker": "Eric"}))
                for i in range(7)
            ]
            await asyncio.sleep(0.05)  # the first plain request is running; the rest wait in the queue
            speech = await http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "nova", "input": "OpenAI."})
            return [speech, *await asyncio.gather(*plain)]

    sizes = []
    for _ in range(3):  # the dispatcher's timing varies; one mixed batch proves the routes share it
        responses = asyncio.run(burst())
        assert all(r.status_code == 200 for r in responses), [r.text[:200] for r in responses]
        assert responses[0].headers["content-type"] == "audio/mpeg"
        sizes.append(int(responses[0].headers["x-tts-batch-size"]))
        if sizes[-1] > 1:
            break
    assert max(sizes) > 1, sizes
