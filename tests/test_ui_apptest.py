"""The Streamlit demo (ui/streamlit_app.py) run by Streamlit's AppTest against a live `bentoml serve`."""

from __future__ import annotations

import io

import httpx
import pytest
import soundfile as sf
from streamlit.testing.v1 import AppTest

from tests.conftest import REPO_ROOT, LiveServer, free_port

APP = str(REPO_ROOT / "ui" / "streamlit_app.py")
SPEAKERS = ["Aiden", "Dylan", "Eric", "Ono_Anna", "Ryan", "Serena", "Sohee", "Uncle_Fu", "Vivian"]


def run_app(monkeypatch: pytest.MonkeyPatch, url: str, **env: str) -> AppTest:
    monkeypatch.setenv("TTS_API_URL", url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    return app


def test_dropdowns_hold_the_servers_speakers_and_languages(monkeypatch: pytest.MonkeyPatch, server: LiveServer):
    app = run_app(monkeypatch, server.url)
    speaker = app.selectbox(key="speaker")
    assert [option.split(" — ")[0] for option in speaker.options] == SPEAKERS
    assert "Youthful Beijing male voice" in speaker.options[1] and "English" in speaker.options[4]
    languages = app.selectbox(key="language").options
    assert languages[0] == "auto" and len(languages) == 11 and "english" in languages
    assert app.text_area(key="text").max_chars == 300  # the server's limit, from /health
    assert "Model loaded and ready" in [s.value for s in app.sidebar.success]
    assert any("`tiny`" in c.value for c in app.sidebar.caption)


def test_synthesis_plays_a_valid_wav_and_keeps_history(monkeypatch: pytest.MonkeyPatch, server: LiveServer):
    app = run_app(monkeypatch, server.url)
    app.selectbox(key="speaker").select("Sohee")
    app.selectbox(key="language").select("korean")
    app.text_area(key="text").input("Hello from the demo page.")
    app.text_input(key="instruct").input("Cheerful.")
    app.button(key="synthesize").click().run()
    assert not app.error, [e.value for e in app.error]
    audio = app.get("audio")
    assert len(audio) == 1 and audio[0].proto.url.endswith(".wav")
    latest = app.session_state["history"][0]
    info = sf.info(io.BytesIO(latest.wav))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert latest.seconds == pytest.approx(info.frames / 24000) and latest.seconds > 0
    assert (latest.speaker, latest.language, latest.instruct) == ("Sohee", "korean", "Cheerful.")
    assert [m.label for m in app.metric] == ["Audio", "Latency"]
    assert app.subheader[0].value == "Latest: Sohee (korean)"
    assert app.metric[0].value == f"{latest.seconds:.2f} s"

    app.text_area(key="text").input("A second line.")
    app.button(key="synthesize").click().run()
    assert len(app.session_state["history"]) == 2
    assert len(app.get("audio")) == 2  # the latest, and the first one replayable under History


def test_unreachable_server_shows_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    app = run_app(monkeypatch, url)
    assert [e.value for e in app.sidebar.error] == [
        f"Cannot reach the TTS service at {url}. Is it running, and is the URL right?"
    ]
    assert not app.selectbox  # no form without a service


def test_server_refusal_and_timeout_are_shown_in_the_page(monkeypatch: pytest.MonkeyPatch, server: LiveServer):
    app = run_app(monkeypatch, server.url)
    app.text_area(key="text").input("Fine text.")
    app.text_input(key="instruct").input("y" * 1001)  # the page leaves this limit to the server
    app.button(key="synthesize").click().run()
    (error,) = [e.value for e in app.error]
    assert error.startswith("The service refused the request (400): instruct:") and "1000" in error
    assert "history" not in app.session_state

    app = run_app(monkeypatch, server.url, TTS_API_TIMEOUT_S="0.001")
    app.text_area(key="text").input("Too slow.")
    app.button(key="synthesize").click().run()
    assert [e.value for e in app.error] == [
        f"The TTS service at {server.url}/v1/tts/synthesize did not answer within 0.001 s."
    ]


def test_empty_text_is_caught_in_the_page(monkeypatch: pytest.MonkeyPatch, server: LiveServer) -> None:
    app = run_app(monkeypatch, server.url)
    app.button(key="synthesize").click().run()
    assert [w.value for w in app.warning] == ["Type some text first."]
    assert "history" not in app.session_state


def test_saved_voices_join_the_speaker_list(monkeypatch: pytest.MonkeyPatch, studio: LiveServer) -> None:
    body = {"name": "apptest-narrator", "description": "A calm narrator.", "language": "english"}
    created = httpx.post(f"{studio.url}/v1/audio/voices", json=body, timeout=120)
    assert created.status_code == 201, created.text
    app = run_app(monkeypatch, studio.url)
    options = app.selectbox(key="speaker").options
    assert "apptest-narrator — designed voice: A calm narrator." in options
    app.selectbox(key="speaker").select("apptest-narrator")
    app.text_area(key="text").input("Once upon a time.")
    app.button(key="synthesize").click().run()
    assert not app.error, [e.value for e in app.error]
    assert app.session_state["history"][0].speaker == "apptest-narrator" and app.session_state["history"][0].seconds > 0
