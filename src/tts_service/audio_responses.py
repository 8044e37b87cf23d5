"""Audio as HTTP responses: a whole file in any format, or a stream as it is generated (a WAV header of
unknown length then PCM, raw PCM, or OpenAI's SSE events), with the X-TTS-* headers.

The synthesizer yields 16-bit little-endian PCM; these helpers frame it for the client and record time
to first audio and real-time factor per streamed request.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import Response, StreamingResponse

from tts_service.audio import CONTENT_TYPES, render
from tts_service.codec import FRAME_RATE_HZ
from tts_service.gateway import OpenStream
from tts_service.metrics import real_time_factor, time_to_first_audio
from tts_service.schemas import StreamFormat, SynthesisJob, SynthesisOutcome

# Response headers a browser client (the Quest app's web view, the Streamlit demo) may read.
AUDIO_HEADERS = [
    "X-TTS-Batch-Size",
    "X-TTS-Audio-Seconds",
    "X-TTS-Sample-Rate",
    "X-TTS-Truncated",
    "X-TTS-Seed",
    "X-TTS-Ignored-Fields",  # set by security.RequestGuardMiddleware
]
ERROR_HEADERS = ["Retry-After", "X-Request-ID"]
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
        frames = round(timing.audio_s * FRAME_RATE_HZ)
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


async def file_response(job: SynthesisJob, outcome: SynthesisOutcome, fmt: str, speed: float = 1.0) -> Response:
    """A whole file in `fmt`, encoded off the event loop."""
    audio = await anyio.to_thread.run_sync(render, outcome.pcm, outcome.sample_rate, fmt, speed)
    headers = {
        "X-Request-ID": job.request_id,
        "X-TTS-Batch-Size": str(outcome.batch_size),
        "X-TTS-Audio-Seconds": f"{audio.seconds:.3f}",
        "X-TTS-Sample-Rate": str(audio.sample_rate),
        "X-TTS-Truncated": "true" if outcome.truncated else "false",
        "X-TTS-Seed": str(job.seed),
    }
    return Response(audio.data, media_type=audio.content_type, headers=headers)


def stream_response(
    job: SynthesisJob, stream: OpenStream, fmt: StreamFormat, route: str, sample_rate: int, sse: bool = False
) -> StreamingResponse:
    """Audio as it is generated; closing the response (the client left) ends the job's generation."""
    timing = Timing(route, sample_rate)
    headers = {
        "X-Request-ID": job.request_id,
        "X-TTS-Sample-Rate": str(sample_rate),
        "X-TTS-Seed": str(job.seed),
        "Cache-Control": "no-store",
    }
    if sse:
        body = sse_stream(stream.first, stream.rest, fmt, timing, stream.close, len(job.text))
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    body = audio_stream(stream.first, stream.rest, fmt, timing, stream.close)
    return StreamingResponse(body, media_type=CONTENT_TYPES[fmt], headers=headers)
