"""Streamlit demo client for the Qwen3-TTS service: try the voices before wiring the VR app.

Talks to the service over HTTP only (no imports from the server package), so it runs on a laptop
against the Spark: `TTS_API_URL=http://SPARK_IP:8000 streamlit run ui/streamlit_app.py`.
"""

from __future__ import annotations

import io
import logging
import os
import time
import wave
from dataclasses import dataclass
from typing import Any

import requests
import streamlit as st

DEFAULT_URL = os.environ.get("TTS_API_URL", "http://localhost:8000").rstrip("/")
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
    speakers = call("GET", f"{base_url}/v1/tts/speakers", INFO_TIMEOUT_S).json()["details"]
    languages = call("GET", f"{base_url}/v1/tts/languages", INFO_TIMEOUT_S).json()["languages"]
    return speakers, languages


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
    extra = " · ".join(x for x in (details.get("description"), details.get("native_language")) if x)
    return f"{details['name']} — {extra}" if extra else details["name"]


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

    if st.button("Synthesize", type="primary", key="synthesize"):
        if not text.strip():
            st.warning("Type some text first.")
        else:
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

    history: list[Synthesis] = st.session_state.get("history", [])
    if history:
        st.subheader(f"Latest: {history[0].speaker} ({history[0].language})")
        show_result(history[0], "latest")
    if len(history) > 1:
        st.subheader("History")
        for index, item in enumerate(history[1:], start=1):
            with st.expander(f"{item.speaker} ({item.language}): {item.text[:60]}"):
                show_result(item, str(index))


main()
