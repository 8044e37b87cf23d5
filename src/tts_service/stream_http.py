"""Streamed audio on the wire: a WAV header of unknown length then PCM, raw PCM, or OpenAI's SSE events.

The synthesizer yields 16-bit little-endian PCM; these helpers frame it for the client and record
time to first audio and real-time factor per request.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import anyio
from pydantic import BaseModel, Field

from tts_service.metrics import real_time_factor, time_to_first_audio
from tts_service.schemas import ModelInfo, QuerySeed, Seed

StreamFormat = Literal["wav", "pcm"]
UNKNOWN_SIZE = 0xFFFFFFFF  # what streaming encoders (e.g. FFmpeg) write when the length is not known yet


def streaming_wav_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte RIFF/WAVE header whose RIFF and data sizes say 'unknown': players read to the end.

    soundfile cannot write such a header (it seeks back to fill in sizes), hence the struct.
    """
    block_align = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", UNKNOWN_SIZE)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, bits)
        + b"data"
        + struct.pack("<I", UNKNOWN_SIZE)
    )


def check_voice(info: ModelInfo, speaker: str, language: str | None) -> tuple[str, str, list[str]] | None:
    """(field, message, allowed) when the loaded model lacks the speaker or language, as the engine says."""
    names = {s.name.lower(): s.name for s in info.speakers}
    if speaker.strip().lower() not in names:
        allowed = sorted(names.values())
        return "speaker", f"unknown speaker {speaker!r}; allowed: {', '.join(allowed)}", allowed
    key = (language or "auto").strip().lower() or "auto"
    if key not in info.languages:
        return "language", f"unknown language {language!r}; allowed: {', '.join(info.languages)}", info.languages
    return None


class Timing:
    """Per-request timing, recorded on /metrics when the stream ends."""

    def __init__(self, route: str, sample_rate: int) -> None:
        self.route, self.sample_rate = route, sample_rate
        self.started = time.perf_counter()
        self.first_audio_s: float | None = None
        self.audio_bytes = 0

    def audio(self, size: int) -> None:
        if self.first_audio_s is None and size:
            self.first_audio_s = time.perf_counter() - self.started
            time_to_first_audio().labels(self.route).observe(self.first_audio_s)
        self.audio_bytes += size

    @property
    def audio_s(self) -> float:
        return self.audio_bytes / 2 / self.sample_rate

    def done(self) -> None:
        elapsed = time.perf_counter() - self.started
        if self.audio_bytes and elapsed > 0:
            real_time_factor().labels(self.route).observe(self.audio_s / elapsed)


async def audio_stream(
    first: bytes, rest: AsyncIterator[bytes], fmt: StreamFormat, timing: Timing, close: Callable[[], Awaitable]
) -> AsyncIterator[bytes]:
    """The response body: header (wav) and PCM as it arrives. Closing it (client gone) ends generation."""
    try:
        if fmt == "wav":
            yield streaming_wav_header(timing.sample_rate) + first
        else:
            yield first
        timing.audio(len(first))
        async for data in rest:
            timing.audio(len(data))
            yield data
    finally:
        timing.done()
        with anyio.CancelScope(shield=True):  # a client that hung up cancels us; closing must still finish
            await close()


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def sse_stream(
    first: bytes,
    rest: AsyncIterator[bytes],
    fmt: StreamFormat,
    timing: Timing,
    close: Callable[[], Awaitable],
    input_chars: int,
) -> AsyncIterator[bytes]:
    """OpenAI's `stream_format: "sse"`: `speech.audio.delta` events with base64 audio, then `speech.audio.done`.

    Each delta carries whole 16-bit samples; with `wav` the first one starts with the header.
    """
    carry = b""
    try:
        prefix = streaming_wav_header(timing.sample_rate) if fmt == "wav" else b""
        chunks = [first]
        async for data in _chain(chunks, rest):
            data = carry + data
            whole = len(data) - len(data) % 2
            data, carry = data[:whole], data[whole:]
            if not data:
                continue
            timing.audio(len(data))
            yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(prefix + data).decode()})
            prefix = b""
        frames = round(timing.audio_s * 12.5)
        usage = {"input_tokens": input_chars, "output_tokens": frames, "total_tokens": input_chars + frames}
        yield sse_event({"type": "speech.audio.done", "usage": usage})
    finally:
        timing.done()
        with anyio.CancelScope(shield=True):  # a client that hung up cancels us; closing must still finish
            await close()


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for item in head:
        yield item
    async for item in rest:
        yield item


class StreamRequest(BaseModel):
    """Body of POST /v1/tts/stream: the synthesize body, with `format` wav (default) or pcm."""

    text: str = Field(min_length=1, description="What to say.")
    speaker: str = Field(description="A built-in speaker, e.g. Ryan (GET /v1/tts/speakers).")
    language: str = Field("auto", description="A language of GET /v1/tts/languages, or auto.")
    instruct: str = Field("", description="Tone and style, e.g. 'Speak warmly' (1.7B models).")
    format: StreamFormat = Field("wav", description="wav: one header of unknown length, then PCM; pcm: raw s16le.")
    seed: Seed = None


class StreamQuery(StreamRequest):
    """GET /v1/tts/stream's query: the same fields, read from text."""

    seed: QuerySeed = None
