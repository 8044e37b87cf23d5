"""Streamlit demo client for the Qwen3-TTS service: try the voices before wiring the VR app.

Talks to the service over HTTP only (no imports from the server package), so it runs on a laptop
against the Spark: `TTS_API_URL=http://SPARK_IP:8000 streamlit run ui/streamlit_app.py`. Two tabs:
*Speak* (built-in speakers and saved voices, whole files or a stream that plays as it arrives) and
*Voices* (design a voice from a description, clone one from an upload or a recording, list, preview,
delete).
"""

from __future__ import annotations

import html
import io
import logging
import os
import time
import wave
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import requests
import streamlit as st

DEFAULT_URL = os.environ.get("TTS_API_URL", "http://localhost:8000").rstrip("/")
# Where the browser itself reaches the service, for streams it plays directly (in compose the demo's
# server reaches the service by its service name, which the browser cannot resolve).
PUBLIC_URL = os.environ.get("TTS_PUBLIC_URL", "").rstrip("/")
UPLOAD_TYPES = ["wav", "flac", "mp3", "ogg", "m4a"]
TIMEOUT_S = float(os.environ.get("TTS_API_TIMEOUT_S", "120"))
# A key of the service's TTS_API_KEYS, sent as `Authorization: Bearer` when the service requires keys.
API_KEY = os.environ.get("TTS_API_KEY", "").strip()
AUTH_HEADERS = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
INFO_TIMEOUT_S = 5.0
HISTORY_SIZE = 5

logger = logging.getLogger("tts_ui")


class ServiceError(Exception):
    """A failure worth showing to the user as one readable sentence."""


@dataclass
class Synthesis:
    text: str
    speaker: str
    language: str
    instruct: str
    wav: bytes
    seconds: float
    latency_s: float
    sample_rate: int


def _error_message(response: requests.Response) -> str:
    """The service's error body in a sentence: its own errors, BentoML's validation errors, or the status."""
    try:
        body: Any = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300] or response.reason}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # OpenAI's shape
        return str(body["error"].get("message"))
    if isinstance(body, dict) and body.get("detail"):
        parts = []
        for item in body["detail"]:
            field = ".".join(str(p) for p in item.get("loc", [])) or "request"
            allowed = f" (allowed: {', '.join(item['allowed'])})" if item.get("allowed") else ""
            parts.append(f"{field}: {item.get('msg', '')}{allowed}")
        return "; ".join(parts)
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    return f"HTTP {response.status_code}"


def call(method: str, url: str, timeout: float, **kwargs: Any) -> requests.Response:
    try:
        headers = {**AUTH_HEADERS, **kwargs.pop("headers", {})}
        response = requests.request(method, url, timeout=timeout, headers=headers, **kwargs)
    except requests.Timeout as exc:
        raise ServiceError(f"The TTS service at {url} did not answer within {timeout:g} s.") from exc
    except requests.ConnectionError as exc:
        raise ServiceError(f"Cannot reach the TTS service at {url}. Is it running, and is the URL right?") from exc
    except requests.RequestException as exc:
        raise ServiceError(f"Request to {url} failed: {exc}") from exc
    if response.status_code >= 400:
        raise ServiceError(f"The service refused the request ({response.status_code}): {_error_message(response)}")
    return response


@st.cache_data(ttl=30, show_spinner=False)
def fetch_voices(base_url: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The built-in speakers (with details) and saved voices, and the languages."""
    speakers = call("GET", f"{base_url}/v1/tts/speakers", INFO_TIMEOUT_S).json()["details"]
    listed = call("GET", f"{base_url}/v1/audio/voices", INFO_TIMEOUT_S).json()["data"]
    saved = [voice for voice in listed if voice.get("kind", "builtin") != "builtin"]
    languages = call("GET", f"{base_url}/v1/tts/languages", INFO_TIMEOUT_S).json()["languages"]
    return speakers + saved, languages


@st.cache_data(ttl=300, show_spinner=False)
def fetch_preview(base_url: str, voice_id: str) -> bytes:
    return call("GET", f"{base_url}/v1/audio/voices/{voice_id}/preview", TIMEOUT_S).content


def fetch_health(base_url: str) -> dict[str, Any]:
    """/health answers 503 with a body while the model loads; that is a state to show, not an error."""
    try:
        response = requests.get(f"{base_url}/health", timeout=INFO_TIMEOUT_S, headers=AUTH_HEADERS)
    except requests.RequestException as exc:
        raise ServiceError(f"Cannot reach the TTS service at {base_url}. Is it running, and is the URL right?") from exc
    try:
        return response.json()
    except ValueError as exc:
        raise ServiceError(f"{base_url}/health did not answer with JSON (HTTP {response.status_code}).") from exc


def synthesize(base_url: str, text: str, speaker: str, language: str, instruct: str) -> Synthesis:
    started = time.perf_counter()
    response = call(
        "POST",
        f"{base_url}/v1/tts/synthesize",
        TIMEOUT_S,
        json={"text": text, "speaker": speaker, "language": language, "instruct": instruct},
    )
    latency = time.perf_counter() - started
    try:
        with wave.open(io.BytesIO(response.content)) as wav:
            rate, frames = wav.getframerate(), wav.getnframes()
    except (wave.Error, EOFError) as exc:
        raise ServiceError("The service answered, but not with a WAV file.") from exc
    return Synthesis(text, speaker, language, instruct, response.content, frames / rate, latency, rate)


def speaker_label(details: dict[str, Any]) -> str:
    kind = details.get("kind")
    if kind in ("clone", "design"):
        what = "cloned voice" if kind == "clone" else f"designed voice: {details.get('description') or ''}"
        return f"{details['name']} — {what}".rstrip(": ")
    extra = " · ".join(x for x in (details.get("description"), details.get("native_language")) if x)
    return f"{details['name']} — {extra}" if extra else details["name"]


def stream_url(base_url: str, text: str, speaker: str, language: str, instruct: str) -> str:
    """`GET /v1/tts/stream`: a browser's audio element plays it as it arrives."""
    query = urlencode({"text": text, "speaker": speaker, "language": language, "instruct": instruct})
    return f"{PUBLIC_URL or base_url}/v1/tts/stream?{query}"


def create_voice(base_url: str, **kwargs: Any) -> dict[str, Any]:
    response = call("POST", f"{base_url}/v1/audio/voices", TIMEOUT_S, **kwargs)
    fetch_voices.clear()
    return response.json()


def show_result(item: Synthesis, key: str) -> None:
    st.audio(item.wav, format="audio/wav")
    cols = st.columns(3)
    cols[0].metric("Audio", f"{item.seconds:.2f} s")
    cols[1].metric("Latency", f"{item.latency_s:.2f} s")
    cols[2].download_button(
        "Download WAV", item.wav, file_name=f"{item.speaker.lower()}-{key}.wav", mime="audio/wav", key=f"dl-{key}"
    )


def sidebar() -> tuple[str, dict[str, Any] | None]:
    with st.sidebar:
        st.header("Service")
        base_url = st.text_input("Service URL", value=DEFAULT_URL, key="api_url").strip().rstrip("/")
        try:
            health = fetch_health(base_url)
        except ServiceError as exc:
            st.error(str(exc))
            return base_url, None
        if health.get("status") == "ok":
            st.success("Model loaded and ready")
        else:
            st.warning("The service is up, but the model is not ready yet. Try again in a moment.")
        st.caption(f"Model: `{health.get('model', '?')}`")
        if st.button("Refresh"):
            fetch_voices.clear()
        return base_url, health


def speak_page(base_url: str, health: dict[str, Any], speakers: list[dict[str, Any]], languages: list[str]) -> None:
    names = [s["name"] for s in speakers]
    labels = {s["name"]: speaker_label(s) for s in speakers}
    speaker = st.selectbox("Speaker", names, format_func=lambda name: labels[name], key="speaker")
    language = st.selectbox("Language", languages, key="language")
    limit = int(health.get("max_text_chars") or 4096)
    text = st.text_area("Text", max_chars=limit, height=140, key="text", placeholder="Type what the voice says")
    st.caption(f"{len(text)} / {limit} characters")
    with st.expander("Advanced options"):
        instruct = st.text_input("Instruct (tone and style)", key="instruct", placeholder="Warm and a little slower")
        if health.get("supports_instruct") is False:
            st.caption("The loaded model ignores instructions (only 1.7B CustomVoice models follow them).")
    streaming = st.toggle("Stream: play as it arrives", key="stream", disabled=bool(API_KEY))
    if API_KEY:
        st.caption("Streams play straight from the service in the browser, which cannot send the API key.")

    if st.button("Synthesize", type="primary", key="synthesize"):
        if not text.strip():
            st.warning("Type some text first.")
        elif streaming:
            st.session_state["streaming_url"] = stream_url(base_url, text, speaker, language, instruct)
        else:
            st.session_state.pop("streaming_url", None)
            with st.spinner("Synthesizing…"):
                try:
                    result = synthesize(base_url, text, speaker, language, instruct)
                except ServiceError as exc:
                    logger.info("synthesis failed: %s", exc)
                    st.error(str(exc))
                    result = None
            if result is not None:
                history = st.session_state.setdefault("history", [])
                history.insert(0, result)
                del history[HISTORY_SIZE:]

    playing = st.session_state.get("streaming_url")
    if streaming and playing:
        st.subheader("Streaming")
        st.html(f'<audio class="tts-stream" controls autoplay src="{html.escape(playing)}"></audio>')
    history: list[Synthesis] = st.session_state.get("history", [])
    if history:
        st.subheader(f"Latest: {history[0].speaker} ({history[0].language})")
        show_result(history[0], "latest")
    if len(history) > 1:
        st.subheader("History")
        for index, item in enumerate(history[1:], start=1):
            with st.expander(f"{item.speaker} ({item.language}): {item.text[:60]}"):
                show_result(item, str(index))


def design_section(base_url: str, languages: list[str]) -> None:
    st.subheader("Design a voice")
    name = st.text_input("Designed voice name", key="design_name", placeholder="harbour-master")
    description = st.text_area(
        "Description", key="design_description", placeholder="An old harbour master: deep, gravelly, slow."
    )
    language = st.selectbox("Language", languages, key="design_language")
    sample = st.text_input("Sample line (optional)", key="design_sample", placeholder="Ahoy there! Mind the ropes.")
    if st.button("Design voice", key="design_voice"):
        body = {"name": name, "description": description, "language": language, "sample_text": sample}
        with st.spinner("Designing…"):
            try:
                voice = create_voice(base_url, json=body)
            except ServiceError as exc:
                st.error(str(exc))
                return
        st.session_state["made_voice"] = voice
        st.rerun()  # so that the lists show it


def clone_section(base_url: str, languages: list[str]) -> None:
    st.subheader("Clone a voice from a recording")
    name = st.text_input("Cloned voice name", key="clone_name", placeholder="companion")
    upload = st.file_uploader("Reference clip (1 to 30 s of clear speech)", type=UPLOAD_TYPES, key="clone_file")
    recording = st.audio_input("…or record one", key="clone_record")
    transcript = st.text_input("What the clip says (optional, better clones)", key="clone_transcript")
    language = st.selectbox("Language", languages, key="clone_language")
    if st.button("Clone voice", key="clone_voice"):
        clip = upload or recording
        if clip is None:
            st.warning("Upload or record a clip first.")
            return
        files = {"audio": (clip.name or "clip.wav", clip.getvalue(), clip.type or "application/octet-stream")}
        data = {"name": name, "transcript": transcript, "language": language}
        with st.spinner("Cloning…"):
            try:
                voice = create_voice(base_url, data=data, files=files)
            except ServiceError as exc:
                st.error(str(exc))
                return
        st.session_state["made_voice"] = voice
        st.rerun()  # so that the lists show it


def voices_page(base_url: str, health: dict[str, Any], voices: list[dict[str, Any]], languages: list[str]) -> None:
    models = health.get("models") or {}
    if "voice_design" in models:
        design_section(base_url, languages)
    else:
        st.info("Designing voices needs a VoiceDesign model: start the service with TTS_DESIGN_MODEL set.")
    if "base" in models:
        clone_section(base_url, languages)
    else:
        st.info("Cloning voices needs a Base model: start the service with TTS_CLONE_MODEL set.")
    made = st.session_state.pop("made_voice", None)
    if made is not None:
        st.success(f"Saved voice {made['name']}: pick it as the speaker on the Speak tab.")
        st.audio(fetch_preview(base_url, made["id"]), format="audio/wav")

    st.subheader("Saved voices")
    if not voices:
        st.caption("None yet.")
    for voice in voices:
        with st.expander(speaker_label(voice)):
            if voice.get("transcript"):
                st.caption(f"Transcript: {voice['transcript']}")
            st.caption(f"Language: {voice.get('language')} · id `{voice['id']}`")
            try:
                st.audio(fetch_preview(base_url, voice["id"]), format="audio/wav")
            except ServiceError as exc:
                st.error(str(exc))
            if st.button("Delete", key=f"delete-{voice['id']}"):
                try:
                    call("DELETE", f"{base_url}/v1/audio/voices/{voice['id']}", TIMEOUT_S)
                except ServiceError as exc:
                    st.error(str(exc))
                fetch_voices.clear()
                st.rerun()


def main() -> None:
    st.set_page_config(page_title="Qwen3-TTS demo", page_icon="🔊")
    st.title("Qwen3-TTS demo")
    base_url, health = sidebar()
    if health is None or health.get("status") != "ok":
        st.info("Set the service URL in the sidebar to a running TTS service.")
        return
    try:
        speakers, languages = fetch_voices(base_url)
    except ServiceError as exc:
        st.error(str(exc))
        return
    speak, voices = st.tabs(["Speak", "Voices"])
    with speak:
        speak_page(base_url, health, speakers, languages)
    with voices:
        voices_page(base_url, health, [s for s in speakers if s.get("kind") in ("clone", "design")], languages)


main()
