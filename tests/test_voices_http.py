"""Saved voices over HTTP (issue 16), on `bentoml serve` with all three tiny models (CustomVoice, Base,
VoiceDesign): create by upload and by description, speak with them on every route and through the
OpenAI SDK, survive a restart, delete with their files, many creates at once, hostile uploads, and a
store that cannot be written."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import soundfile as sf

from tests.clips import HOSTILE, soundfile_bytes
from tests.conftest import LiveServer, running_server, studio_env

VOICES = "/v1/audio/voices"
LINE = "Good morning captain, the tide is high."


def decode(wav: bytes) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == 24_000
    return audio


def reference_wav(seconds: float = 3.0, pitch: float = 140.0) -> bytes:
    t = np.arange(int(seconds * 24_000)) / 24_000
    voice = 0.3 * np.sin(2 * np.pi * pitch * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    return soundfile_bytes(voice.astype(np.float32), 24_000, "WAV", "PCM_16")


def clone(
    http: httpx.Client, name: str, transcript: str = "Ahoy there, welcome aboard.", **fields: str
) -> httpx.Response:
    data = {"name": name, "transcript": transcript, **fields}
    return http.post(VOICES, data=data, files={"audio": ("clip.wav", reference_wav(), "audio/wav")})


@pytest.fixture()
def http(studio: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=studio.url, timeout=120) as client:
        yield client


def test_health_and_models_say_which_model_kinds_are_loaded(http: httpx.Client, studio: LiveServer) -> None:
    assert http.get("/health").json()["models"] == {"custom_voice": "tiny", "base": "tiny", "voice_design": "tiny"}
    kinds = {card["kind"] for card in http.get("/v1/models").json()["data"]}
    assert kinds == {"custom_voice", "base", "voice_design"}
    # The three models ship one speech tokenizer, so they share one decoder process (each holds ~0.5 GB).
    tree = psutil.Process(studio.process.pid).children(recursive=True)
    assert sum("tts_service.decoder_process" in " ".join(p.cmdline()) for p in tree) == 1


def test_a_cloned_voice_speaks_on_every_route(http: httpx.Client, studio: LiveServer) -> None:
    created = clone(http, "harbour-master", language="english")
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["kind"] == "clone" and voice["speaks_with"] == "base" and voice["language"] == "english"
    assert voice["transcript"] == "Ahoy there, welcome aboard." and voice["id"].startswith("voice_")
    assert created.headers["location"] == f"{VOICES}/{voice['id']}"
    assert http.get(f"{VOICES}/HARBOUR-MASTER").json() == voice  # by name, any case, and by id
    assert http.get(f"{VOICES}/{voice['id']}").json() == voice
    listed = {v["name"]: v for v in http.get(VOICES).json()["data"]}
    assert listed["harbour-master"]["kind"] == "clone" and listed["Ryan"]["kind"] == "builtin"
    preview = http.get(voice["preview_url"])
    assert preview.headers["content-type"] == "audio/wav" and abs(len(decode(preview.content)) - 72_000) < 100

    whole = http.post("/v1/tts/synthesize", json={"text": LINE, "speaker": "harbour-master", "seed": 7})
    assert whole.status_code == 200, whole.text
    audio = decode(whole.content)
    assert len(audio) > 0 and len(audio) % 1920 == 0 and np.abs(audio).max() > 0.01
    again = http.post("/v1/tts/synthesize", json={"text": LINE, "speaker": voice["id"], "seed": 7})
    np.testing.assert_array_equal(decode(again.content), audio)  # greedy: the same line, the same audio
    streamed = http.post("/v1/tts/stream", json={"text": LINE, "speaker": "harbour-master", "format": "pcm"})
    assert streamed.status_code == 200
    pcm = np.frombuffer(streamed.content, dtype="<i2")
    assert len(pcm) == len(audio)
    got = http.get("/v1/tts/stream", params={"text": LINE, "speaker": "Harbour-Master"})
    assert got.status_code == 200 and len(got.content) > 44
    mp3 = http.post("/v1/tts/synthesize", json={"text": LINE, "speaker": "harbour-master", "format": "mp3"})
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg"

    sdk = openai.OpenAI(base_url=f"{studio.url}/v1", api_key="any", max_retries=0, timeout=120)
    spoken = sdk.audio.speech.create(model="tts-1", voice="harbour-master", input=LINE, response_format="wav")
    np.testing.assert_array_equal(decode(spoken.content), audio)
    slow = sdk.audio.speech.create(model="tts-1", voice="harbour-master", input=LINE, response_format="wav", speed=0.5)
    assert len(decode(slow.content)) > 1.8 * len(audio)


def test_a_designed_voice_is_made_from_a_description(http: httpx.Client) -> None:
    body = {"name": "robot", "description": "A small friendly robot.", "language": "english", "sample_text": "Beep!"}
    created = http.post(VOICES, json=body)
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["kind"] == "design" and voice["description"] == "A small friendly robot."
    assert voice["speaks_with"] == "base"  # a clone model is loaded: the designed line was cloned
    assert len(decode(http.get(voice["preview_url"]).content)) > 0
    spoken = http.post("/v1/audio/speech", json={"model": "tts-1", "input": LINE, "voice": {"id": voice["id"]}})
    assert spoken.status_code == 200 and spoken.headers["content-type"] == "audio/mpeg"


def test_concurrent_creates_all_succeed_and_duplicates_get_409(http: httpx.Client) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: clone(http, f"crew-{i}"), range(8)))
    assert [r.status_code for r in results] == [201] * 8, [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 8
    with ThreadPoolExecutor(4) as pool:
        racing = list(pool.map(lambda _: clone(http, "Lookout"), range(4)))
    assert sorted(r.status_code for r in racing) == [201, 409, 409, 409]
    duplicate = clone(http, "CREW-3")
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["param"] == "name" and "already exists" in duplicate.json()["error"]["message"]
    names = [v["name"] for v in http.get(VOICES).json()["data"]]
    assert sum(name.lower() == "lookout" for name in names) == 1 and all(f"crew-{i}" in names for i in range(8))


def hostile_uploads() -> dict[str, tuple[bytes, int]]:
    cases = {name: (make(), 400) for name, (make, _) in HOSTILE.items()}
    cases["50 MB"] = (os.urandom(1024) * 50 * 1024, 413)
    return cases


@pytest.mark.parametrize("name", sorted(hostile_uploads()))
def test_hostile_uploads_are_refused_and_the_service_keeps_serving(http: httpx.Client, name: str) -> None:
    data, status = hostile_uploads()[name]
    files = {"audio": ("voice.wav", data, "audio/wav")}
    refused = http.post(VOICES, data={"name": f"hostile {name}"}, files=files)
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert error["param"] == "audio", error
    assert f"hostile {name}" not in [v["name"] for v in http.get(VOICES).json()["data"]]
    assert http.post("/v1/tts/synthesize", json={"text": "Still here.", "speaker": "Ryan"}).status_code == 200


def test_bad_voice_requests_name_their_field(http: httpx.Client) -> None:
    cases = [
        (dict(data={"name": "no file"}), 415, "content-type"),  # a form without a file is not multipart
        (dict(data={"transcript": "x"}, files={"audio": ("a.wav", reference_wav(), "audio/wav")}), 400, "name"),
        (dict(data={"name": "x"}, files={"clip": ("a.wav", reference_wav(), "audio/wav")}), 400, "audio"),
        (dict(data={"name": "x", "language": "klingon"}, files={"audio": ("a.wav", reference_wav())}), 400, "language"),
        (dict(data={"name": "Ryan"}, files={"audio": ("a.wav", reference_wav())}), 400, "name"),
        (dict(data={"name": "a/b" * 40}, files={"audio": ("a.wav", reference_wav())}), 400, "name"),
        (dict(json={"name": "d"}), 400, "description"),
        (dict(json={"name": "d", "description": "x", "colour": "red"}), 400, "colour"),
    ]
    for kwargs, status, field in cases:
        response = http.post(VOICES, **kwargs)
        assert response.status_code == status, (kwargs.get("data") or kwargs.get("json"), response.text)
        assert response.json()["error"]["param"] == field, response.text
    assert http.get(f"{VOICES}/no-such-voice").status_code == 404
    assert http.get(f"{VOICES}/no-such-voice/preview").status_code == 404
    missing = http.delete(f"{VOICES}/no-such-voice")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    unknown = http.post("/v1/tts/synthesize", json={"text": "Hi.", "speaker": "nobody"})
    assert unknown.status_code == 400 and "harbour-master" in unknown.json()["detail"][0]["allowed"]


def test_voices_survive_a_restart_and_delete_removes_their_files(
    cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    library = tmp_path_factory.mktemp("restart-library")
    env = studio_env(cache_dir, library)
    logs = tmp_path_factory.mktemp("restart")
    with running_server(env, logs / "first.log") as first, httpx.Client(base_url=first.url, timeout=120) as http:
        voice = clone(http, "companion").json()
        before = http.post("/v1/tts/synthesize", json={"text": LINE, "speaker": "companion"}).content
    with running_server(env, logs / "second.log") as second, httpx.Client(base_url=second.url, timeout=120) as http:
        assert http.get(f"{VOICES}/companion").json() == voice
        after = http.post("/v1/tts/synthesize", json={"text": LINE, "speaker": "companion"}).content
        np.testing.assert_array_equal(decode(after), decode(before))
        folder = library / "voices" / voice["id"]
        assert (folder / "prompt.safetensors").is_file() and (folder / "reference.wav").is_file()
        assert http.delete(f"{VOICES}/{voice['id']}").status_code == 200
        assert not folder.exists()
        assert http.get(f"{VOICES}/companion").status_code == 404
        assert "companion" not in [v["name"] for v in http.get(VOICES).json()["data"]]
        gone = http.post("/v1/tts/synthesize", json={"text": LINE, "speaker": "companion"})
        assert gone.status_code == 400 and gone.json()["detail"][0]["loc"] == ["speaker"]


def test_without_the_models_or_a_writable_store_voice_routes_say_what_to_do(
    server: LiveServer, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:  # TTS_MODEL only
        assert http.get("/health").json()["models"] == {"custom_voice": "tiny"}
        cloning = clone(http, "nope")
        assert cloning.status_code == 400 and "TTS_CLONE_MODEL" in cloning.json()["error"]["message"]
        designing = http.post(VOICES, json={"name": "nope", "description": "A robot."})
        assert designing.status_code == 400 and "TTS_DESIGN_MODEL" in designing.json()["error"]["message"]

    blocked = tmp_path_factory.mktemp("blocked") / "not-a-folder"
    blocked.write_text("a file where the voice library should be")
    env = studio_env(cache_dir, blocked)
    with (
        running_server(env, blocked.parent / "serve.log") as live,
        httpx.Client(base_url=live.url, timeout=120) as http,
    ):
        refused = clone(http, "nowhere")
        assert refused.status_code == 503 and "TTS_VOICES_DIR" in refused.json()["error"]["message"]
        assert [v["kind"] for v in http.get(VOICES).json()["data"]] == ["builtin"] * 9
        assert http.post("/v1/tts/synthesize", json={"text": "Still here.", "speaker": "Ryan"}).status_code == 200
    assert blocked.read_text() == "a file where the voice library should be"
