"""Streaming over HTTP on a live `bentoml serve` (tiny checkpoint, greedy): /v1/tts/stream, OpenAI's
stream formats, shared decode steps seen from the server, cancellation, metrics, and Chromium playback."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from playwright.sync_api import sync_playwright

from tests.conftest import CHROMIUM, CHROMIUM_ARGS, LiveServer

STREAM = "/v1/tts/stream"
LONG = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen."
BODY = {"text": LONG, "speaker": "Ryan", "language": "english"}  # 125 frames, 10 s, on the tiny checkpoint
SPF = 1920
# Same tolerance as tests/test_streaming_engine.py explains: chunks decoded with 25 frames of context.
MAX_ERROR = 0.02 * 32768


def _pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.int32)


def _reference(client: httpx.Client, body: dict) -> np.ndarray:
    response = client.post("/v1/tts/synthesize", json=body)
    assert response.status_code == 200
    samples, _ = sf.read(io.BytesIO(response.content), dtype="int16")
    return samples.astype(np.int32)


def _request_log_line(server: LiveServer, request_id: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if f"request {request_id} " in line and "decode steps" in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no log line for request {request_id}:\n{server.log()[-3000:]}")


def test_stream_is_a_chunked_wav_that_equals_the_whole_file(client: httpx.Client, server: LiveServer) -> None:
    reference = _reference(client, BODY)
    arrivals: list[tuple[float, int]] = []
    started = time.perf_counter()
    with client.stream("POST", STREAM, json=BODY) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/wav"
        assert response.headers["transfer-encoding"] == "chunked" and "content-length" not in response.headers
        assert response.headers["x-tts-sample-rate"] == "24000"
        data = b""
        for chunk in response.iter_raw():
            arrivals.append((time.perf_counter() - started, len(chunk)))
            data += chunk
    # One RIFF header whose sizes say "unknown", then 16-bit PCM.
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    assert data[4:8] == data[40:44] == b"\xff\xff\xff\xff"
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000 and len(samples) == len(reference) == 125 * SPF
    assert np.abs(samples.astype(np.int32) - reference).max() <= MAX_ERROR
    # The audio arrived in pieces over time, the first well before the end.
    assert len(arrivals) >= 4
    assert arrivals[0][0] < 0.6 * arrivals[-1][0], arrivals


def test_pcm_stream_and_get_url_carry_the_same_samples(client: httpx.Client) -> None:
    wav = client.post(STREAM, json=BODY).content
    pcm = client.post(STREAM, json={**BODY, "format": "pcm"})
    assert pcm.headers["content-type"] == "audio/pcm"
    assert pcm.content == wav[44:]
    by_url = client.get(STREAM, params=BODY)
    assert by_url.status_code == 200 and by_url.content == wav


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**BODY, "speaker": "Nobody"}, "speaker"),
        ({**BODY, "speaker": "../../etc/passwd"}, "speaker"),
        ({**BODY, "language": "Klingon"}, "language"),
        ({**BODY, "format": "mp3"}, "format"),
        ({**BODY, "text": "   "}, "text"),
        ({**BODY, "text": "x" * 301}, "text"),  # the test server's TTS_MAX_TEXT_CHARS is 300
        ({"speaker": "Ryan"}, "text"),
    ],
)
def test_bad_stream_requests_get_400_naming_the_field(client: httpx.Client, body: dict, field: str) -> None:
    for response in (client.post(STREAM, json=body), client.get(STREAM, params=body)):
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["detail"][0]["loc"] == [field], error
        if field in ("speaker", "language"):
            assert "allowed" in error["detail"][0]["msg"]


def test_openai_audio_stream_format_streams_pcm(client: httpx.Client) -> None:
    body = {"model": "tts-1", "voice": "verse", "input": LONG, "language": "english", "response_format": "pcm"}
    whole = client.post("/v1/audio/speech", json=body)
    assert "content-length" in whole.headers  # not asked to stream: one file, as before
    streamed = client.post("/v1/audio/speech", json={**body, "stream_format": "audio"})
    assert streamed.status_code == 200 and streamed.headers["transfer-encoding"] == "chunked"
    assert streamed.headers["content-type"] == "audio/pcm"
    a, b = _pcm16(whole.content), _pcm16(streamed.content)
    assert len(a) == len(b) and np.abs(a - b).max() <= MAX_ERROR


def test_openai_sse_stream(client: httpx.Client) -> None:
    body = {"model": "tts-1", "voice": "verse", "input": LONG, "language": "english", "response_format": "pcm"}
    whole = _pcm16(client.post("/v1/audio/speech", json=body).content)
    with client.stream("POST", "/v1/audio/speech", json={**body, "stream_format": "sse"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= 4 and {e["type"] for e in deltas} == {"speech.audio.delta"}
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["output_tokens"] == 125 and done["usage"]["input_tokens"] == len(LONG)
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert all(len(base64.b64decode(e["audio"])) % 2 == 0 for e in deltas)  # whole samples only
    streamed = _pcm16(audio)
    assert len(streamed) == len(whole) and np.abs(streamed - whole).max() <= MAX_ERROR

    wav = client.post("/v1/audio/speech", json={**body, "response_format": "wav", "stream_format": "sse"})
    first = json.loads(wav.text.split("\n\n")[0][6:])
    assert base64.b64decode(first["audio"])[:4] == b"RIFF"


@pytest.mark.parametrize(
    ("extra", "param"), [({"response_format": "mp3"}, "response_format"), ({"speed": 1.5}, "speed")]
)
def test_openai_sse_refuses_what_it_cannot_stream(client: httpx.Client, extra: dict, param: str) -> None:
    body = {"model": "tts-1", "voice": "echo", "input": "Hi", "response_format": "pcm", "stream_format": "sse"}
    response = client.post("/v1/audio/speech", json={**body, **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_two_streams_started_apart_share_decode_steps(client: httpx.Client, server: LiveServer) -> None:
    """Proved from the server's side: its log line per stream counts the steps shared with another."""
    results: dict[str, httpx.Response] = {}
    under_way = threading.Event()

    def run(name: str, body: dict) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http, http.stream("POST", STREAM, json=body) as r:
            data = b""
            for piece in r.iter_raw():
                data += piece
                under_way.set()
            results[name] = httpx.Response(r.status_code, headers=r.headers, content=data)

    first = threading.Thread(target=run, args=("first", BODY))
    second_body = {"text": "The gallery is on the second floor.", "speaker": "Vivian", "language": "english"}
    second = threading.Thread(target=run, args=("second", second_body))
    first.start()
    assert under_way.wait(60)  # the first is under way (its audio is arriving) when the second arrives
    second.start()
    first.join(120)
    second.join(120)
    assert results["first"].status_code == results["second"].status_code == 200
    lines = {name: _request_log_line(server, r.headers["x-request-id"]) for name, r in results.items()}
    shared = {name: int(re.search(r"(\d+) of them shared", line)[1]) for name, line in lines.items()}
    steps = {name: int(re.search(r"(\d+) decode steps", line)[1]) for name, line in lines.items()}
    assert steps["first"] == 125
    assert shared["second"] > 0 and shared["first"] > 0, lines
    assert shared["first"] < steps["first"], lines  # it started alone
    assert "(batch up to 2)" in lines["second"]
    # And the audio of each is still its own.
    assert np.abs(_pcm16(results["first"].content[44:]) - _reference(client, BODY)).max() <= MAX_ERROR


def test_a_client_that_hangs_up_frees_its_stream(client: httpx.Client, server: LiveServer) -> None:
    with client.stream("POST", STREAM, json=BODY) as response:
        request_id = response.headers["x-request-id"]
        next(response.iter_raw())  # the first audio arrived; now hang up
    line = _request_log_line(server, request_id, timeout_s=10)
    assert " cancelled: " in line, line
    frames = int(re.search(r"cancelled: (\d+) frames", line)[1])
    assert frames < 125
    # The service goes on serving.
    assert client.post(STREAM, json={**BODY, "text": "Still here."}).status_code == 200


def test_every_response_names_its_request_as_the_log_does(client: httpx.Client, server: LiveServer) -> None:
    """A user quotes X-Request-ID; the server's line for that request names it, streamed or not."""
    whole = client.post("/v1/tts/synthesize", json={**BODY, "text": "Which request was this?"})
    speech = client.post("/v1/audio/speech", json={"model": "tts-1", "input": "And this one?", "voice": "alloy"})
    streamed = client.post(STREAM, json={**BODY, "text": "And this stream?"})
    ids = [r.headers["x-request-id"] for r in (whole, speech, streamed)]
    assert len(set(ids)) == 3
    assert " (whole file) done: " in _request_log_line(server, ids[0])
    assert " (whole file) done: " in _request_log_line(server, ids[1])
    assert " (stream) done: " in _request_log_line(server, ids[2])


def test_time_to_first_audio_and_rtf_are_on_metrics(client: httpx.Client) -> None:
    client.post(STREAM, json={**BODY, "text": "Metrics, please."})
    client.post("/v1/tts/synthesize", json={**BODY, "text": "And these."})
    metrics = client.get("/metrics").text
    assert re.search(r'tts_time_to_first_audio_seconds_count\{route="/v1/tts/stream"\} [1-9]', metrics)
    assert re.search(r'tts_real_time_factor_count\{route="/v1/tts/stream"\} [1-9]', metrics)
    assert re.search(r'tts_time_to_first_audio_seconds_count\{route="/v1/tts/synthesize"\} [1-9]', metrics)
    assert re.search(r"tts_step_batch_size_count [1-9]", metrics)
    assert re.search(r"tts_queue_wait_seconds_count [1-9]", metrics)


def test_chromium_plays_a_streamed_wav(server: LiveServer, tmp_path) -> None:
    """An <audio> element pointed at the stream's URL starts playing while the server still generates."""
    src = f"{server.url}{STREAM}?" + httpx.QueryParams(BODY).__str__()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/health")  # same origin as the stream
            page.set_content(f'<audio id="a" preload="auto" src="{src}"></audio>')
            state = page.evaluate(
                """async () => {
                    const a = document.getElementById('a');
                    const errors = [];
                    a.addEventListener('error', () => errors.push(a.error && a.error.message));
                    await a.play();
                    await new Promise(r => setTimeout(r, 1500));
                    return {time: a.currentTime, paused: a.paused, errors, rate: a.playbackRate};
                }"""
            )
            page.screenshot(path=str(tmp_path / "stream.png"))
        finally:
            browser.close()
    assert state["errors"] == [] and not state["paused"], state
    assert state["time"] > 0.5, state  # it played 10 s of audio for over half a second
