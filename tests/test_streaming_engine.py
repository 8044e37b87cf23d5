"""The incremental generate loop against qwen-tts's own generate_custom_voice, on the tiny checkpoint.

Tolerance for the waveform, and why: the codec codes must be identical (greedy decoding, same model).
The audio then differs only where a chunk was decoded with 25 frames (2 s) of left context instead of
everything before it: the same left context qwen-tts's own `chunked_decode` uses at its seams. Output
of chunks that start within 25 frames of the beginning matches to 1 LSB (float rounding); later, on the tiny random
decoder, the error stays under 0.02 of full scale with a signal-to-error ratio above 30 dB
(measured: 0.006 and 40 dB). A seam must not add a jump (click) beyond that same 0.02.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tts_service.audio import decode_wav
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.streaming import ChunkPlan, StreamScheduler

SPF = 1920  # samples per codec frame
# Greedy lengths on the tiny checkpoint: 125, 48, 45 and 8 frames.
LONG = SynthesisRequest(
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen.",
    "ryan",
    "english",
)
REQUESTS = [
    LONG,
    SynthesisRequest(
        "The museum opens at nine and closes at six every day except Monday, when it is closed for cleaning.",
        "ryan",
        "english",
    ),
    SynthesisRequest("これは日本語のテキストです。", "vivian", "auto"),
    SynthesisRequest(
        "Please keep your hands inside the vehicle at all times and enjoy the ride through the ancient forest.",
        "vivian",
        "english",
        "Speak happily",
    ),
]
MAX_ERROR = 0.02
MIN_SNR_DB = 30.0


@pytest.fixture(scope="module")
def scheduler(engine: TTSEngine) -> StreamScheduler:
    return StreamScheduler(engine, ChunkPlan(first_frames=4, frames=16, left_context=25))


@pytest.fixture(scope="module")
def reference(engine: TTSEngine) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each request alone through qwen-tts's generate_custom_voice: its codes and its 16-bit samples."""
    tokenizer = engine.model.model.speech_tokenizer
    original = tokenizer.decode
    codes: list[torch.Tensor] = []

    def recording_decode(encoded):  # the real decoder, with the codes noted on the way
        codes.append(encoded[0]["audio_codes"].clone())
        return original(encoded)

    tokenizer.decode = recording_decode
    try:
        results = {}
        for request in REQUESTS:
            [result] = engine.synthesize([request])
            results[request.text] = (codes[-1].numpy(), decode_wav(result.wav)[0].astype(np.float64) / 32768)
        return results
    finally:
        tokenizer.decode = original


@pytest.fixture()
def recorded_codes(scheduler: StreamScheduler) -> Iterator[dict[str, np.ndarray]]:
    """The codes each stream generated, noted as it finishes."""
    codes: dict[str, np.ndarray] = {}
    original = scheduler._finish

    def finish(row, error=None):
        if row.codes:
            codes[row.handle.request_id] = torch.stack(row.codes).numpy()
        original(row, error)

    scheduler._finish = finish
    yield codes
    del scheduler._finish


def _as_pcm16(chunks: list[np.ndarray]) -> np.ndarray:
    """What the wire carries: the float chunks as 16-bit samples, back as floats."""
    samples = np.concatenate(chunks)
    return np.round(np.clip(samples, -1, 1) * 32767) / 32768


def _check_audio(streamed: np.ndarray, reference: np.ndarray, seams: list[int]) -> None:
    assert len(streamed) == len(reference)
    error = streamed - reference
    assert np.abs(error).max() <= MAX_ERROR
    snr = 10 * np.log10(np.mean(reference**2) / max(np.mean(error**2), 1e-20))
    assert snr >= MIN_SNR_DB
    for seam in seams:  # the step across a seam is the reference's step, give or take the tolerance
        jump = streamed[seam] - streamed[seam - 1]
        assert abs(jump - (reference[seam] - reference[seam - 1])) <= MAX_ERROR, seam


def test_a_stream_equals_the_whole_utterance(scheduler, reference, recorded_codes) -> None:
    handle = scheduler.submit(LONG, "alone")
    chunks = list(handle)
    ref_codes, ref_audio = reference[LONG.text]
    assert handle.end is not None and handle.end.error is None and not handle.end.truncated
    assert handle.end.frames == len(ref_codes) == 125
    np.testing.assert_array_equal(recorded_codes["alone"], ref_codes)
    sizes = [len(chunk) // SPF for chunk in chunks]
    assert sizes[0] == 4 and set(sizes[1:-1]) == {16} and 1 <= sizes[-1] <= 16  # 4, 16, 16, ..., rest
    assert all(len(chunk) % SPF == 0 for chunk in chunks)
    streamed = _as_pcm16(chunks)
    # Chunks starting within 25 frames of the beginning were decoded with all that came before:
    # the first three (frames 0 to 36), equal to 1 LSB.
    exact = (4 + 16 + 16) * SPF
    assert np.abs(streamed[:exact] - ref_audio[:exact]).max() <= 1.5 / 32768
    seams = list(np.cumsum([len(c) for c in chunks])[:-1])
    _check_audio(streamed, ref_audio, seams)


def test_streams_joining_at_different_times_share_steps_and_keep_their_codes(
    scheduler, reference, recorded_codes
) -> None:
    handles = []
    for index, request in enumerate(REQUESTS):
        handles.append(scheduler.submit(request, f"joined-{index}"))
        time.sleep(0.15)  # each joins a batch already running
    audio = [_as_pcm16(list(handle)) for handle in handles]
    for index, (request, handle) in enumerate(zip(REQUESTS, handles, strict=True)):
        ref_codes, ref_audio = reference[request.text]
        np.testing.assert_array_equal(recorded_codes[f"joined-{index}"], ref_codes)
        _check_audio(audio[index], ref_audio, [])
        assert handle.end.shared_steps > 0, handle.end
    assert max(handle.end.max_batch for handle in handles) >= 3
    # The long stream ran alone at the end, after the others left the batch.
    assert handles[0].end.shared_steps < handles[0].end.steps


def test_cancelling_a_stream_frees_its_slot_at_once(scheduler: StreamScheduler) -> None:
    long_one = scheduler.submit(LONG, "to-cancel")
    neighbour = scheduler.submit(REQUESTS[2], "neighbour")
    iterator = iter(long_one)
    first = next(iterator)
    assert len(first) == 4 * SPF
    long_one.cancel()
    rest = list(iterator)
    assert long_one.end is not None and long_one.end.cancelled
    assert long_one.end.frames < 125 and len(rest) <= 2  # at most what was decoded before the next step
    assert len(list(neighbour)) > 0 and neighbour.end.error is None and not neighbour.end.cancelled
    deadline = time.monotonic() + 5
    while scheduler.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.active == 0
    assert scheduler.cancel("to-cancel") is False  # gone from the books


def test_sampling_streams_run_and_batch_output_path_still_works(engine: TTSEngine) -> None:
    """With the model's own sampling (not greedy) streams still produce audio, and a non-streamed batch
    on the same model in another thread waits for the model lock instead of corrupting a step."""
    sampling = StreamScheduler(engine, ChunkPlan(2, 8, 25))
    sampling._generation_kwargs = lambda: {}  # qwen-tts's generation config: do_sample=True
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(engine.synthesize([REQUESTS[2]])))
    handle = sampling.submit(REQUESTS[1], "sampled")
    thread.start()
    audio = np.concatenate(list(handle))
    thread.join(timeout=120)
    assert handle.end.error is None and handle.end.frames >= 2 and len(audio) == handle.end.frames * SPF
    assert np.abs(audio).max() > 0.01
    assert results and results[0].frames > 0
