"""Security and failure handling on a live server: API keys, body limits, content types, a bounded
queue, and a crash inside generation that must fail only its own request."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import REPO_ROOT, LiveServer, running_server

KEYS = ("key-one-4f9a", "key-two-77c1")
MARK = "FAULT-7c3e"
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
SYNTH = "/v1/tts/synthesize"


@pytest.fixture(scope="module")
def guarded(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_server(
        {
            "TTS_MODEL": "tiny",
            "TTS_CACHE_DIR": str(cache_dir),
            "TTS_GREEDY": "true",
            "TTS_API_KEYS": ",".join(KEYS),
            "TTS_MAX_QUEUE": "2",
            "TTS_MAX_BODY_BYTES": "4096",
            "TTS_TEST_FAULT_MARK": MARK,
            "PYTHONPATH": str(REPO_ROOT / "tests" / "faults"),
        },
        tmp_path_factory.mktemp("guarded") / "serve.log",
    ) as live:
        yield live


@pytest.fixture()
def http(guarded: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.url, timeout=120) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", SYNTH),
        ("POST", "/v1/audio/speech"),
        ("GET", "/v1/models"),
        ("GET", "/v1/audio/voices"),
        ("GET", "/v1/tts/speakers"),
        ("GET", "/docs.json"),
        ("GET", "/metrics"),
    ],
)
def test_every_route_but_health_needs_a_key(http: httpx.Client, method: str, path: str) -> None:
    body = {"text": "hi", "speaker": "Ryan"} if path == SYNTH else {"model": "tts-1", "voice": "nova", "input": "hi"}
    kwargs = {"json": body} if method == "POST" else {}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]}):  # last: no "Bearer"
        response = http.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 401, (path, headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert "Authorization: Bearer" in message
    assert http.request(method, path, headers={"Authorization": f"Bearer {KEYS[0]}"}, **kwargs).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/audio/voices"),
        ("GET", "/v1/audio/voices/x"),
        ("GET", "/v1/audio/voices/x/preview"),
        ("DELETE", "/v1/audio/voices/x"),
    ],
)
def test_the_voice_library_needs_a_key(http: httpx.Client, method: str, path: str) -> None:
    kwargs = {"files": {"audio": ("a.wav", b"RIFF")}, "data": {"name": "x"}} if method == "POST" else {}
    refused = http.request(method, path, **kwargs)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    keyed = http.request(method, path, headers={"Authorization": f"Bearer {KEYS[0]}"}, **kwargs)
    assert keyed.status_code in (400, 404), keyed.text  # past the key: no clone model here, no voice x


def test_health_readiness_and_cors_preflight_need_no_key(http: httpx.Client) -> None:
    for path in ("/health", "/readyz", "/livez"):
        assert http.get(path).status_code == 200
    preflight = http.options(SYNTH, headers={"Origin": "https://quest.local", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200


def test_openai_client_sends_its_key(guarded: LiveServer) -> None:
    good = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEYS[0], max_retries=0)
    speech = good.audio.speech.create(model="tts-1", voice="nova", input="Hello.")
    assert speech.response.headers["content-type"] == "audio/mpeg" and len(speech.content) > 100
    bad = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sk-not-ours", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.body["type"] == "authentication_error"


def test_keys_never_reach_the_log(guarded: LiveServer, http: httpx.Client) -> None:
    http.get("/v1/models", headers=AUTH)
    http.get("/v1/models", headers={"Authorization": "Bearer sk-leak-check"})
    log = guarded.log()
    assert not any(key in log for key in (*KEYS, "sk-leak-check"))


def test_oversized_bodies_get_413_declared_or_streamed(http: httpx.Client) -> None:
    big = {"text": "x" * 5000, "speaker": "Ryan"}
    response = http.post(SYNTH, json=big, headers=AUTH)
    assert response.status_code == 413 and "4096 bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'", "speaker": "Ryan"}'

    response = http.post(SYNTH, content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413
    speech = http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "nova", "input": "x" * 5000}, headers=AUTH)
    assert speech.status_code == 413 and speech.json()["error"]["param"] == "body"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_non_json_bodies_get_415(http: httpx.Client, content_type: str) -> None:
    for path in (SYNTH, "/v1/audio/speech"):
        response = http.post(path, content=b"text=hi", headers={**AUTH, "content-type": content_type})
        assert response.status_code == 415, response.text
        assert "application/json" in response.text


def test_a_full_queue_answers_429_at_once_and_recovers(guarded: LiveServer, http: httpx.Client) -> None:
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60, headers=AUTH) as client:
            return await asyncio.gather(
                *[client.post(SYNTH, json={"text": f"Crowd line number {i}.", "speaker": "Aiden"}) for i in range(10)]
            )

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert "busy" in refused.json()["error"]
    assert http.post(SYNTH, json={"text": "Calm again.", "speaker": "Aiden"}, headers=AUTH).status_code == 200


def test_sustained_overload_ends_every_request_cleanly(guarded: LiveServer) -> None:
    """5x the queue limit of clients for 10 s (scripts/overload.py and scripts/mixed_load.py run longer):
    each request gets a 200 with audio or a 429 with Retry-After within its timeout, and the service
    recovers."""
    from scripts.overload import overload

    clients = 5 * 2  # the guarded server's TTS_MAX_QUEUE is 2
    result = asyncio.run(overload(guarded.url, clients=clients, seconds=10, timeout_s=90, headers=AUTH))
    print("overload:", result)
    assert result["unacceptable"] == {}, result
    assert result["outcomes"].get("200", 0) >= 5 and result["outcomes"].get("429", 0) >= clients, result
    assert result["max_s"]["429"] < 5, result  # refusals come at once, not after queueing
    assert result["all_done_after_s"] < 10 + 90, result
    assert result["after_status"] == 200 and result["after_is_wav"], result


def test_a_crash_in_generation_fails_only_its_request(guarded: LiveServer) -> None:
    async def mixed() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60, headers=AUTH) as client:
            calls = [client.post(SYNTH, json={"text": f"{MARK} poisoned.", "speaker": "Ryan"})]
            calls.append(client.post(SYNTH, json={"text": "A healthy neighbour.", "speaker": "Ryan"}))
            return await asyncio.gather(*calls)

    poisoned, healthy = asyncio.run(mixed())
    assert healthy.status_code == 200 and healthy.content[:4] == b"RIFF"
    assert poisoned.status_code == 500
    request_id = poisoned.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", request_id)
    assert request_id in poisoned.json()["error"]
    log = guarded.log()
    assert f"requests {request_id}" in log or f"request {request_id}" in log
    assert "RuntimeError: injected generation fault" in log  # logged with its traceback

    speech = httpx.post(
        f"{guarded.url}/v1/audio/speech",
        json={"model": "tts-1", "voice": "nova", "input": f"{MARK} again"},
        headers=AUTH,
        timeout=60,
    )
    assert speech.status_code == 500 and speech.json()["error"]["type"] == "server_error"
    assert speech.headers["x-request-id"] in speech.json()["error"]["message"]


def test_the_openapi_document_lists_every_error_a_route_sends(http: httpx.Client) -> None:
    spec = http.get("/docs.json", headers=AUTH).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    for path in (SYNTH, "/v1/audio/speech"):
        operation = spec["paths"][path]["post"]
        assert operation["requestBody"]["required"] is True
        assert operation["security"] == [{"bearerAuth": []}]
        responses = operation["responses"]
        assert {"200", "400", "401", "413", "415", "429", "500"} <= set(responses), (path, sorted(responses))
        assert "Retry-After" in responses["429"]["headers"] and "X-Request-ID" in responses["500"]["headers"]
        assert {"audio/wav", "audio/mpeg", "audio/pcm"} <= set(responses["200"]["content"])
    assert spec["paths"][SYNTH]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert "security" not in spec["paths"]["/readyz"]["get"]


def test_the_demo_ui_talks_to_a_keyed_server_with_its_key(monkeypatch: pytest.MonkeyPatch, guarded: LiveServer) -> None:
    """docker-compose.yml gives the UI its own key (TTS_UI_API_KEY) when the service has keys on."""
    from tests.test_ui_apptest import SPEAKERS, run_app

    app = run_app(monkeypatch, guarded.url, TTS_API_KEY=KEYS[1])
    assert [option.split(" — ")[0] for option in app.selectbox(key="speaker").options] == SPEAKERS
    app.text_area(key="text").input("A keyed hello.")
    app.button(key="synthesize").click().run()
    assert not app.error, [e.value for e in app.error]
    assert app.session_state["history"][0].wav[:4] == b"RIFF"
