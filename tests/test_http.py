"""The HTTP API of a real `bentoml serve` process on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import io
import re
import time

import httpx
import pytest
import soundfile as sf

from tests.conftest import LiveServer

SPEAKERS = ["Aiden", "Dylan", "Eric", "Ono_Anna", "Ryan", "Serena", "Sohee", "Uncle_Fu", "Vivian"]
SYNTH = "/v1/tts/synthesize"


def assert_wav(response: httpx.Response) -> sf._SoundFileInfo:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    info = sf.info(io.BytesIO(response.content))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames > 0 and info.frames % 1920 == 0
    assert float(response.headers["x-tts-audio-seconds"]) == pytest.approx(info.frames / 24000, abs=1e-3)
    return info


def test_synthesize_returns_a_wav(client: httpx.Client) -> None:
    response = client.post(SYNTH, json={"text": "Hello from the Quest.", "speaker": "Ryan"})
    assert_wav(response)
    assert response.headers["x-tts-sample-rate"] == "24000"
    assert response.headers["x-tts-truncated"] == "false"


def test_all_fields_and_case_insensitive_names(client: httpx.Client) -> None:
    response = client.post(
        SYNTH,
        json={"text": "Bonjour à tous.", "speaker": "uncle_FU", "language": "French", "instruct": "Whisper softly."},
    )
    assert_wav(response)


def test_greedy_service_output_is_reproducible(client: httpx.Client) -> None:
    body = {"text": "Same text twice.", "speaker": "Serena", "language": "english"}
    assert client.post(SYNTH, json=body).content == client.post(SYNTH, json=body).content


def test_health_speakers_languages(client: httpx.Client) -> None:
    assert client.get("/health").json() == {
        "status": "ok",
        "model_loaded": True,
        "model": "tiny",
        "max_text_chars": 300,
        "supports_instruct": True,
        "sample_rate": 24000,
        "models": {"custom_voice": "tiny"},
    }
    speakers = client.get("/v1/tts/speakers").json()
    assert speakers["speakers"] == SPEAKERS
    assert {d["name"]: d["native_language"] for d in speakers["details"]}["Ono_Anna"] == "Japanese"
    languages = client.get("/v1/tts/languages").json()["languages"]
    assert languages[0] == "auto" and len(languages) == 11 and "english" in languages


def test_bentoml_builtin_endpoints_keep_working(client: httpx.Client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert "bentoml_service_request_total" in client.get("/metrics").text
    assert "<html" in client.get("/").text.lower()


def test_openapi_documents_every_endpoint_with_schema_and_example(client: httpx.Client) -> None:
    spec = client.get("/docs.json").json()
    paths = spec["paths"]
    for path in ("/health", "/v1/tts/speakers", "/v1/tts/languages"):
        assert "get" in paths[path], path
    synth = paths[SYNTH]["post"]
    assert "audio/wav" in synth["responses"]["200"]["content"]
    assert {"X-Request-ID", "X-TTS-Seed", "X-TTS-Batch-Size"} <= set(synth["responses"]["200"]["headers"])
    schema = synth["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert set(schema["required"]) == {"text", "speaker"}
    assert schema["properties"]["text"]["maxLength"] == 300
    assert schema["properties"]["speaker"]["examples"] == ["Ryan"]


def test_cors_preflight_from_a_foreign_origin(client: httpx.Client) -> None:
    response = client.options(
        SYNTH,
        headers={
            "Origin": "http://quest.local:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "http://quest.local:5173")
    assert "POST" in response.headers["access-control-allow-methods"]
    simple = client.post(SYNTH, json={"text": "Hi", "speaker": "Ryan"}, headers={"Origin": "http://quest.local"})
    assert simple.headers["access-control-allow-origin"] in ("*", "http://quest.local")
    assert "x-tts-audio-seconds" in simple.headers["access-control-expose-headers"].lower()
    assert "x-tts-ignored-fields" in simple.headers["access-control-expose-headers"].lower()


def error_locs(response: httpx.Response) -> list[str]:
    return [".".join(str(p) for p in d["loc"]) for d in response.json()["detail"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": "", "speaker": "Ryan"}, "text"),
        ({"text": "   \n\t ", "speaker": "Ryan"}, "text"),
        ({"text": "x" * 301, "speaker": "Ryan"}, "text"),
        ({"speaker": "Ryan"}, "text"),
        ({"text": "hi"}, "speaker"),
        ({"text": 5, "speaker": "Ryan"}, "text"),
        ({"text": "hi", "speaker": ["Ryan"]}, "speaker"),
        ({"text": "hi", "speaker": "Ryan", "language": None}, "language"),
    ],
)
def test_bad_fields_get_400_naming_the_field(client: httpx.Client, body: dict, field: str) -> None:
    response = client.post(SYNTH, json=body)
    assert response.status_code == 400, response.text
    assert field in error_locs(response)


@pytest.mark.parametrize(
    ("body", "field", "allowed"),
    [
        ({"text": "hi", "speaker": "Bob"}, "speaker", SPEAKERS),
        ({"text": "hi", "speaker": "../../etc/passwd"}, "speaker", SPEAKERS),
        ({"text": "hi", "speaker": "Ryan", "language": "klingon"}, "language", None),
    ],
)
def test_unknown_voices_get_400_with_the_allowed_values(client: httpx.Client, body, field, allowed) -> None:
    response = client.post(SYNTH, json=body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    [detail] = response.json()["detail"]
    assert detail["loc"] == [field]
    assert detail["allowed"] == (allowed or client.get("/v1/tts/languages").json()["languages"])
    assert body[field] in detail["msg"]


def test_fields_not_in_the_api_are_named_in_a_header(client: httpx.Client) -> None:
    """A misspelt field is ignored (as OpenAI's SDKs may send newer ones), but never silently."""
    typo = client.post(SYNTH, json={"text": "hi", "speaker": "Ryan", "spead": 2, "formt": "mp3"})
    assert typo.status_code == 200 and typo.headers["content-type"] == "audio/wav"
    assert typo.headers["x-tts-ignored-fields"] == '"formt", "spead"'
    assert "x-tts-ignored-fields" not in client.post(SYNTH, json={"text": "hi", "speaker": "Ryan"}).headers
    speech = {"model": "tts-1", "input": "hi", "voice": "alloy", "response_format": "wav", "sped": 2}
    assert client.post("/v1/audio/speech", json=speech).headers["x-tts-ignored-fields"] == '"sped"'
    with client.stream("POST", "/v1/tts/stream", json={"text": "hi", "speaker": "Ryan", "fromat": "pcm"}) as r:
        assert r.status_code == 200 and r.headers["x-tts-ignored-fields"] == '"fromat"'
    # Names that a header cannot carry as they are go as JSON strings, not as a broken response.
    odd = {"text": "hi", "speaker": "Ryan", "a\nb\u00e9\u0000": 1, " ": None, "x" * 100: 1}
    response = client.post(SYNTH, json=odd)
    assert response.status_code == 200
    assert response.headers["x-tts-ignored-fields"] == f'" ", "a\\nb\\u00e9\\u0000", "{"x" * 64}"'


def test_a_missing_speaker_is_told_the_speakers(client: httpx.Client) -> None:
    """As a wrong speaker is: the body and the GET stream's query alike."""
    for response in (client.post(SYNTH, json={"text": "hi"}), client.get("/v1/tts/stream", params={"text": "hi"})):
        assert response.status_code == 400, response.text
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["speaker"] and detail["allowed"][: len(SPEAKERS)] == SPEAKERS
        assert "required" in detail["msg"].lower() and "allowed: Aiden, Dylan" in response.json()["error"]


@pytest.mark.parametrize("raw", [b'{"text": "hi"', b"not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_invalid_json_bodies_get_400(client: httpx.Client, raw: bytes) -> None:
    response = client.post(SYNTH, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_server_keeps_serving_after_bad_input(client: httpx.Client) -> None:
    for body in ({"text": ""}, {"text": "hi", "speaker": "Bob"}, {"text": 1}):
        assert client.post(SYNTH, json=body).status_code == 400
    assert_wav(client.post(SYNTH, json={"text": "Still here.", "speaker": "Aiden"}))


def step_histogram(metrics: str) -> dict[str, float]:
    """Cumulative bucket counts of the engine's step batch size histogram."""
    buckets = {}
    for line in metrics.splitlines():
        if line.startswith("tts_step_batch_size_bucket"):
            buckets[re.search(r'le="([^"]+)"', line).group(1)] = float(line.rsplit(" ", 1)[1])
    return buckets


def test_concurrent_requests_share_decode_steps(server: LiveServer, client: httpx.Client) -> None:
    """Eight whole-file requests of any speaker, language and instruct join one step batch."""
    assert client.post(SYNTH, json={"text": "Warm up.", "speaker": "Ryan"}).status_code == 200
    before = step_histogram(client.get("/metrics").text)

    async def burst() -> list[httpx.Response]:
        speakers = ["Ryan", "Vivian", "Eric", "Sohee"]
        languages = ["english", "chinese", "auto", "korean"]
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(
                *[
                    http.post(
                        SYNTH,
                        json={
                            "text": f"Concurrent request number {i}.",
                            "speaker": speakers[i % 4],
                            "language": languages[i % 4],
                            "instruct": "calm" if i % 2 else "",
                        },
                    )
                    for i in range(8)
                ]
            )

    responses = asyncio.run(burst())
    for response in responses:
        assert_wav(response)
    sizes = [int(r.headers["x-tts-batch-size"]) for r in responses]
    assert max(sizes) >= 4, sizes  # the largest step batch each request shared
    after = step_histogram(client.get("/metrics").text)
    assert (after["+Inf"] - after["1.0"]) > (before["+Inf"] - before["1.0"])  # steps with more than one row ran
    assert re.search(r"batch up to [2-8]\)", server.log())  # the engine's own log line


def test_one_error_body_on_every_plain_route_and_one_log_line(client: httpx.Client, server: LiveServer) -> None:
    """The same mistake gets the same body from the WAV route and both stream routes, in the service's
    shape (not pydantic's, with its `url` fields), and the server logs it as one line, not a traceback."""
    logged = len(server.log())
    bodies = {"speaker": {"text": "hi", "speaker": "Bob"}, "text": {"speaker": "Ryan"}}
    for field, body in bodies.items():
        answers = [
            client.post(SYNTH, json=body),
            client.post("/v1/tts/stream", json=body),
            client.get("/v1/tts/stream", params=body),
        ]
        for response in answers:
            assert response.status_code == 400, response.text
            error = response.json()
            assert set(error) == {"error", "detail"} and field in error["error"], error
            assert [d["loc"] for d in error["detail"]] == [[field]], error
            assert error["detail"][0]["type"] == f"invalid_{field}", error
            assert "url" not in error["detail"][0] and "validation error for" not in error["error"]
        assert answers[0].json()["detail"] == answers[1].json()["detail"] == answers[2].json()["detail"]
    time.sleep(0.5)
    new_log = server.log()[logged:]
    assert "Traceback" not in new_log and "[ERROR]" not in new_log, new_log[-3000:]
    assert new_log.count("-> 400") >= 2, new_log[-3000:]


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/nope", 404, None),  # no route at all: BentoML's router
        ("GET", "/v1/tts/nope", 404, None),
        ("PUT", SYNTH, 405, "POST"),  # an @bentoml.api route: BentoML's router
        ("DELETE", "/v1/tts/stream", 405, "GET, POST"),  # a FastAPI route
    ],
)
def test_unknown_routes_and_methods_get_the_json_error_body(
    client: httpx.Client, method: str, path: str, status: int, allow: str | None
) -> None:
    """Every refusal is JSON in the service's shape, the router's own 404 and 405 too (not text/plain),
    saying what was asked and, for a 405, what is allowed (also in Allow)."""
    response = client.request(method, path)
    assert response.status_code == status and response.headers["content-type"] == "application/json", response.text
    error = response.json()
    assert set(error) == {"error", "detail"} and path in error["error"], error
    assert error["detail"][0]["type"] == ("not_found" if status == 404 else "method_not_allowed"), error
    if allow is not None:
        assert response.headers["allow"] == allow and f"allowed: {allow}" in error["error"], error


def test_unknown_openai_routes_get_the_openai_error_body(client: httpx.Client) -> None:
    response = client.get("/v1/audio/nope")
    assert response.status_code == 404 and response.headers["content-type"] == "application/json"
    assert (
        response.json()["error"]["type"] == "not_found_error"
        and "/v1/audio/nope" in response.json()["error"]["message"]
    )
    response = client.post("/v1/models")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"
