"""Streams from the step engine against qwen-tts's own generate_custom_voice, on the tiny checkpoint,
with both stream decoders: stateful (the CPU default; equal to a whole decode) and windowed (the GPU's).

Tolerance for the waveform, and why: the codec codes must be identical (greedy decoding, same model).
The audio then differs only where a chunk was decoded with 25 frames (2 s) of left context instead of
everything before it: the same left context qwen-tts's own `chunked_decode` uses at its seams. Output
of chunks that start within 25 frames of the beginning matches to 1 LSB (float rounding); later, on the tiny random
decoder, the error stays under 0.02 of full scale with a signal-to-error ratio above 30 dB
(measured: 0.006 and 40 dB). A seam must not add a jump (click) beyond that same 0.02.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch

from tests.oracle import ORACLE_REQUESTS
from tests.oracle import reference as plain_qwen_tts
from tts_service.chunk_decoder import STREAM, WHOLE_FILE, ChunkDecoder, Ending, Window, stateful_batch_limit
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.request_handle import RequestHandle
from tts_service.scheduler import _Row
from tts_service.settings import Settings

SPF = 1920  # samples per codec frame
# Greedy lengths on the tiny checkpoint: 125, 48, 8 and 23 frames.
LONG = ORACLE_REQUESTS[0]
REQUESTS = [
    LONG,
    SynthesisRequest(
        "The museum opens at nine and closes at six every day except Monday, when it is closed for cleaning.",
        "ryan",
        "english",
    ),
    ORACLE_REQUESTS[1],
    ORACLE_REQUESTS[2],
]
MAX_ERROR = 0.02
MIN_SNR_DB = 30.0


@pytest.fixture(scope="module")
def reference(engine: TTSEngine) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each request alone through qwen-tts's generate_custom_voice: its codes and its 16-bit samples."""
    results = {}
    for request in REQUESTS:
        codes, audio = plain_qwen_tts(engine, request)
        results[request.text] = (codes, np.round(np.clip(audio, -1, 1) * 32767) / 32768)
    return results


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


@pytest.fixture(scope="module")
def window_engine(tiny_dir, cache_dir) -> TTSEngine:
    """Streams decoded as windows with 25 frames of left context (the GPU's path)."""
    return TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", stream_decoder="window")
    )


def test_a_stateful_stream_equals_the_whole_utterance(engine: TTSEngine, reference) -> None:
    """The CPU default: the decoder's state is carried from chunk to chunk, so a stream's audio is the
    whole-utterance decode of its codes (float rounding aside: at most 1e-4, then 16-bit rounding)."""
    assert engine.scheduler.stateful_streams
    handle = engine.submit(LONG, "stateful", stream=True)
    chunks = list(handle)
    ref_codes, ref_audio = reference[LONG.text]
    np.testing.assert_array_equal(handle.end.codes, ref_codes)
    assert [len(c) // SPF for c in chunks][:5] == [4, 4, 8, 16, 16]  # none longer than the audio before it
    streamed = np.concatenate(chunks)
    exact = np.round(np.clip(streamed, -1, 1) * 32767) / 32768
    assert len(streamed) == len(ref_audio) and np.abs(exact - ref_audio).max() <= 1.5 / 32768


def test_a_windowed_stream_equals_the_whole_utterance(window_engine: TTSEngine, reference) -> None:
    engine = window_engine
    handle = engine.submit(LONG, "alone", stream=True)
    chunks = list(handle)
    ref_codes, ref_audio = reference[LONG.text]
    assert handle.end is not None and handle.end.error is None and not handle.end.truncated
    assert handle.end.frames == len(ref_codes) == 125
    np.testing.assert_array_equal(handle.end.codes, ref_codes)
    sizes = [len(chunk) // SPF for chunk in chunks]
    assert sizes[:3] == [4, 4, 8] and set(sizes[3:-1]) == {16} and 1 <= sizes[-1] <= 16  # 4, 4, 8, 16, ..., rest
    assert all(len(chunk) % SPF == 0 for chunk in chunks)
    streamed = _as_pcm16(chunks)
    # Chunks starting within 25 frames of the beginning were decoded with all that came before:
    # the first four (frames 0 to 32), equal to 1 LSB.
    exact = (4 + 4 + 8 + 16) * SPF
    assert np.abs(streamed[:exact] - ref_audio[:exact]).max() <= 1.5 / 32768
    seams = list(np.cumsum([len(c) for c in chunks])[:-1])
    _check_audio(streamed, ref_audio, seams)


@pytest.mark.parametrize("decoder", ["stateful", "window"])
def test_streams_joining_at_different_times_share_steps_and_keep_their_codes(
    engine: TTSEngine, window_engine: TTSEngine, reference, decoder: str
) -> None:
    engine = engine if decoder == "stateful" else window_engine
    handles, firsts, rests = [], [], []
    for index, request in enumerate(REQUESTS):
        handle = engine.submit(request, f"joined-{index}", stream=True)
        chunks = iter(handle)
        firsts.append(next(chunks))  # it is running (4 of its 23 or more frames out): the next joins it
        handles.append(handle)
        rests.append(chunks)
    audio = [_as_pcm16([first, *rest]) for first, rest in zip(firsts, rests, strict=True)]
    for index, (request, handle) in enumerate(zip(REQUESTS, handles, strict=True)):
        ref_codes, ref_audio = reference[request.text]
        np.testing.assert_array_equal(handle.end.codes, ref_codes)
        _check_audio(audio[index], ref_audio, [])
        assert handle.end.shared_steps > 0, handle.end
    assert max(handle.end.max_batch for handle in handles) >= 3
    # The long stream ran alone at the end, after the others left the batch.
    assert handles[0].end.shared_steps < handles[0].end.steps


@pytest.fixture(scope="module")
def quick_engine(tiny_dir, cache_dir) -> TTSEngine:
    """Batch invariance off (a GPU's default), so quick start is on."""
    return TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", batch_invariant=False)
    )


def test_quick_start_needs_time_to_spare() -> None:
    """A quick first chunk only while no request waits for a slot, steps run 3x faster than real time and
    every other stream has half a second of audio in hand (one that has sent none has nothing in hand)."""
    from tts_service.stream_plan import QUICK_START_MAX_STEP_S, quick_start_fits

    fast = QUICK_START_MAX_STEP_S / 2
    assert quick_start_fits([], fast, waiting=False)
    assert quick_start_fits([0.5, 3.0], fast, waiting=False)
    assert not quick_start_fits([0.5, 0.49], fast, waiting=False)  # one of them is ramping up
    assert not quick_start_fits([None], fast, waiting=False)  # it has not started yet
    assert not quick_start_fits([], fast, waiting=True)
    assert not quick_start_fits([], QUICK_START_MAX_STEP_S * 1.01, waiting=False)
    assert not quick_start_fits([], None, waiting=False)  # no step measured


def test_a_stream_starts_with_one_frame_only_while_the_engine_has_time_to_spare(
    quick_engine: TTSEngine, engine: TTSEngine, reference, caplog: pytest.LogCaptureFixture
) -> None:
    """With batch invariance off, a stream that starts with nobody else ramping up gets a first chunk of
    1 frame and ramps 1, 1, 2, 4, 8, 16; two starting together both get the plan's 4 (each would ramp while
    the other does); one starting beside streams with seconds in hand gets 1 again. Codes are qwen-tts's
    and the audio its whole decode either way. With batch invariance (the CPU default) the plan is fixed."""
    assert quick_engine.scheduler.quick_start and not engine.scheduler.quick_start
    caplog.set_level("INFO", logger="tts_service.scheduler")
    lone = quick_engine.submit(LONG, "quick-lone", stream=True)
    chunks = list(lone)
    assert [len(c) // SPF for c in chunks][:7] == [1, 1, 2, 4, 8, 16, 16]
    ref_codes, ref_audio = reference[LONG.text]
    np.testing.assert_array_equal(lone.end.codes, ref_codes)
    assert np.abs(_as_pcm16(chunks) - ref_audio).max() <= 1.5 / 32768

    with quick_engine.scheduler._wake:  # the loop admits both in one turn (it takes the queue under this lock)
        pair = [quick_engine.submit(LONG, f"quick-pair-{i}", stream=True) for i in range(2)]
    streams = [iter(handle) for handle in pair]
    heard: list[list[np.ndarray]] = [[], []]
    for index, stream in enumerate(streams):  # until each has 2 s of audio out, far ahead of a listener
        while sum(len(c) for c in heard[index]) < 2 * 24000:
            heard[index].append(next(stream))
    late = quick_engine.submit(REQUESTS[1], "quick-late", stream=True)
    late_chunks = list(late)
    for index, stream in enumerate(streams):
        heard[index].extend(stream)
    assert [len(heard[i][0]) // SPF for i in range(2)] == [4, 4]
    assert [len(c) // SPF for c in late_chunks][:3] == [1, 1, 2]
    for handle in pair:
        np.testing.assert_array_equal(handle.end.codes, ref_codes)
    np.testing.assert_array_equal(late.end.codes, reference[REQUESTS[1].text][0])
    assert np.abs(_as_pcm16(late_chunks) - reference[REQUESTS[1].text][1]).max() <= 1.5 / 32768
    assert "request quick-lone (stream, quick start) done" in caplog.text  # the log says which got one


def test_one_slow_turn_does_not_cost_a_lone_stream_its_quick_start(quick_engine: TTSEngine) -> None:
    """The engine's pace is the median of its last 8 step intervals: one slow turn among them (a long
    admission, a pause of the whole process) leaves a lone stream its first chunk of 1 frame; mostly slow
    steps take it away."""
    from tts_service.stream_plan import QUICK_START_MAX_STEP_S

    scheduler = quick_engine.scheduler
    fast, slow = QUICK_START_MAX_STEP_S / 4, 0.4
    for index, (intervals, first) in enumerate((([fast] * 7 + [slow], 1), ([slow] * 5 + [fast] * 3, 4))):
        scheduler.step_intervals.clear()  # the loop is idle: the last request has ended
        scheduler.step_intervals.extend(intervals)
        chunks = list(quick_engine.submit(REQUESTS[3], f"pace-{index}", stream=True))
        assert len(chunks[0]) // SPF == first, intervals


def test_the_time_to_first_audio_is_broken_down_in_order(engine: TTSEngine) -> None:
    """Each handle's timeline (bench_engine.py's first-audio table): submitted, prefilled, first frame read,
    first window queued to the decoder, first audio handed over, in that order, for a stream and a whole
    file; a stream's first audio is stamped before its consumer gets it."""
    phases = ["submitted", "prefilled", "first_frame", "first_window", "first_audio"]
    stream = engine.submit(REQUESTS[3], "timeline-stream", stream=True)  # 23 frames: chunks of 4, 4, 8, then 7
    arrivals = []
    for _chunk in stream:
        arrivals.append(time.perf_counter())
    whole = engine.submit(REQUESTS[3], "timeline-file", stream=False)
    list(whole)
    for handle in (stream, whole):
        assert handle.end.error is None
        times = [handle.timeline[phase] for phase in phases]
        assert times == sorted(times), dict(zip(phases, times, strict=True))
    assert stream.timeline["first_audio"] <= arrivals[0] < arrivals[-1]
    assert len(arrivals) == 4


def test_the_loop_time_is_accounted_by_phase(engine: TTSEngine) -> None:
    """`loop_seconds` (bench_engine.py's loop table) sums each phase of the engine loop; together they fit
    inside the wall time of the requests, the frame step takes most of it, and the decoder's time is counted."""
    scheduler = engine.scheduler
    scheduler.reset_time_accounting()
    started = time.perf_counter()
    engine.synthesize(REQUESTS[1])
    time.sleep(0.05)  # the loop's last turn is summed just after it has handed the end over
    wall = time.perf_counter() - started
    spent = scheduler.loop_seconds
    assert set(spent) == {"admit", "step", "collect", "hand_off"} and min(spent.values()) >= 0
    assert 0 < sum(spent.values()) <= wall
    assert spent["step"] > max(spent["admit"], spent["collect"], spent["hand_off"])
    assert 0 < scheduler.decoder.busy_seconds <= wall


def test_the_decoder_serves_the_listener_who_runs_dry_first(engine: TTSEngine) -> None:
    """Under load the decoder has a queue. Streams go before whole files (nobody hears those before their
    last chunk); among streams, the window whose listener runs out of audio first: a stream that is
    already late, then new streams' first windows (due now), then a stream with a second of audio in
    hand. First in, first out among equal deadlines, and a request's end after its chunks whatever its deadline."""
    source = engine.scheduler.decoder
    decoder = ChunkDecoder(source.decoder, source.samples_per_frame, torch.device("cpu"), threaded=True)
    heard: list[str] = []

    class Handle:
        end = None

        def __init__(self, name: str) -> None:
            self.name = name

        def _put(self, audio: np.ndarray) -> None:
            assert len(audio) == 4 * SPF
            heard.append(self.name)

    busy, release, drained = threading.Event(), threading.Event(), threading.Event()
    decoder.put([Ending(Handle("busy"), lambda: (busy.set(), release.wait(30)))], STREAM)
    assert busy.wait(30)  # the decoder is busy: what follows queues up behind it
    codes = np.arange(4 * 16).reshape(4, 16) % 2048
    now = time.perf_counter()
    in_hand = Handle("stream with audio in hand")
    decoder.put([Window(Handle("whole file"), codes, 0)], WHOLE_FILE)
    decoder.put(
        # Its end's deadline is earlier than its window's (as when its first audio came sooner than assumed):
        # the queue still keeps it after the window.
        [Window(in_hand, codes, 0, deadline=now + 1), Ending(in_hand, lambda: heard.append("its end"), now - 1)],
        STREAM,
    )
    decoder.put([Window(Handle("stream 1, first window"), codes, 0, deadline=now)], STREAM)
    decoder.put([Window(Handle("stream 2, first window"), codes, 0, deadline=now)], STREAM)
    decoder.put([Window(Handle("late stream"), codes, 0, deadline=now - 0.5)], STREAM)
    decoder.put([Ending(Handle("last"), drained.set)], WHOLE_FILE)
    release.set()
    assert drained.wait(60)
    assert heard == [
        "late stream",
        "stream 1, first window",
        "stream 2, first window",
        "stream with audio in hand",
        "its end",
        "whole file",
    ]


def test_stateful_windows_of_different_streams_are_decoded_together_when_due(engine: TTSEngine) -> None:
    """Queued stateful windows of the same length go to the decoder as one batch: with the queue's first
    window due, only companions that are due too; with time in hand, any. Never two windows of one stream
    (its chunks stay in order), nor windows of another length. Each stream's audio equals its whole decode."""
    source = engine.scheduler.decoder
    decoder = ChunkDecoder(source.decoder, source.samples_per_frame, torch.device("cpu"), threaded=True)
    batches: list[list[str]] = []
    heard: dict[str, list[np.ndarray]] = {}
    decode_many = decoder.decode_stateful_many

    class Handle:
        end = None

        def __init__(self, name: str) -> None:
            self.name = name
            self.state = decoder.new_state()
            heard[name] = []

        def _put(self, audio: np.ndarray) -> None:
            heard[self.name].append(audio)

    def recording(states, codes):
        batches.append([handle.name for state in states for handle in handles if handle.state is state])
        return decode_many(states, codes)

    codes = np.random.default_rng(3).integers(0, 2048, size=(5, 12, 16))
    a, b, c, d = handles = [Handle("a"), Handle("b"), Handle("c"), Handle("d")]
    busy, release, drained = threading.Event(), threading.Event(), threading.Event()
    with mock.patch.object(decoder, "decode_stateful_many", side_effect=recording):
        decoder.put([Ending(Handle("busy"), lambda: (busy.set(), release.wait(30)))], STREAM)
        assert busy.wait(30)
        now = time.perf_counter()
        decoder.put([Window(a, codes[0, :4], 0, a.state, deadline=now)], STREAM)  # first windows: due
        decoder.put([Window(b, codes[1, :4], 0, b.state, deadline=now)], STREAM)
        decoder.put([Window(c, codes[2, :8], 0, c.state, deadline=now + 0.01)], STREAM)  # another length
        decoder.put([Window(a, codes[0, 4:8], 0, a.state, deadline=now + 20)], STREAM)  # a's next: after a's first
        decoder.put([Window(d, codes[3, :4], 0, d.state, deadline=now + 30)], STREAM)  # audio in hand
        decoder.put([Ending(Handle("last"), drained.set)], WHOLE_FILE)
        release.set()
        assert drained.wait(60)
    assert batches == [["a", "b"], ["c"], ["a", "d"]]
    expected = {"a": codes[0, :8], "b": codes[1, :4], "c": codes[2, :8], "d": codes[3, :4]}
    with torch.inference_mode():
        for name, stream in expected.items():
            whole = source.decoder(torch.from_numpy(stream.T[None])).squeeze(1)[0].numpy()
            np.testing.assert_allclose(np.concatenate(heard[name]), whole, atol=1e-4, rtol=0)


def test_batched_stateful_windows_stay_within_the_limit_and_one_per_stream() -> None:
    """The grouping of windows handed over together: stateful ones by length, at most one per stream per
    batch and at most `stateful_batch_limit` per batch; windows without state by length. Unbatched, each alone."""

    class Handle:
        end = None

    codes4, codes16 = np.zeros((4, 16), np.int64), np.zeros((16, 16), np.int64)
    first, second = Handle(), Handle()
    many = [Window(Handle(), codes16, 0, state=object()) for _ in range(6)]
    windows = [
        Window(first, codes4, 0, state=object()),
        Window(second, codes4, 0, state=object()),
        Window(first, codes4, 0, state=object()),  # first's next chunk
        *many,
        Window(Handle(), codes4, 0),
        Window(Handle(), codes4, 0),
    ]
    groups = ChunkDecoder._groups(windows)
    assert [[windows.index(w) for w in group] for group in groups] == [[0, 1], [2], [3, 4, 5, 6], [7, 8], [9, 10]]
    from8 = ChunkDecoder._groups(windows, min_frames=8)  # 4-frame windows alone, as batch invariance may measure
    assert [[windows.index(w) for w in group] for group in from8] == [[0], [1], [2], [3, 4, 5, 6], [7, 8], [9, 10]]
    alone = ChunkDecoder._groups(windows, batched=False)  # batch invariance on a GPU: each window alone
    assert [[windows.index(w) for w in group] for group in alone] == [[i] for i in range(len(windows))]
    assert [stateful_batch_limit(frames) for frames in (1, 2, 3, 4, 16, 64)] == [1, 1, 1, 8, 4, 1]
    assert [stateful_batch_limit(frames, 8) for frames in (4, 7, 8, 16)] == [1, 1, 8, 4]  # as measured on a Xeon


def test_a_streams_deadline_is_when_its_listener_would_run_out(engine: TTSEngine) -> None:
    """Before its first audio a stream's window is due at once; after it, when the audio sent before it has
    played (the decoder's queue, not the deadline, keeps a request's items in order)."""
    scheduler = engine.scheduler
    frame = SPF / engine.sample_rate  # seconds of audio per frame
    row = _Row(engine.job(SynthesisRequest("Hello there.", "ryan", "english"), stream=True), RequestHandle("d", None))
    assert scheduler._deadline(row, now=10.0) == 10.0
    row.decoded = 4
    assert scheduler._deadline(row, now=10.1) == pytest.approx(10.1 + 4 * frame)
    row.handle.timeline["first_audio"] = 10.2
    row.decoded = 8
    assert scheduler._deadline(row, now=10.3) == pytest.approx(10.2 + 8 * frame)
    hello = SynthesisRequest("Hello there.", "ryan", "english")
    files = _Row(engine.job(hello, stream=False), RequestHandle("f", None))
    assert scheduler._deadline(files, now=10.0) == 0.0


def test_a_streams_chunks_stay_in_order_when_its_windows_are_decoded_with_others(window_engine: TTSEngine) -> None:
    """Windows without decoder state that are due at the same turn are queued as one unit, placed by its most
    urgent window. A stream's next window sharing a unit with a new stream's first window (due at once) must
    still come after the stream's earlier window, which waits in the queue with a later deadline: else the
    listener hears its chunks swapped (found under CPU load, where the decoder lags behind the steps). The
    decoder's queue keeps each request's items in order, and forgets a request once it has ended."""
    scheduler = window_engine.scheduler
    frame = SPF / window_engine.sample_rate
    hello = SynthesisRequest("Hello there.", "ryan", "english")
    playing = _Row(window_engine.job(hello, stream=True), RequestHandle("playing", None))
    playing.codes = [np.full(16, i % 2048) for i in range(8)]
    playing.decoded, playing.handle.timeline["first_audio"] = 4, 10.0  # 4 frames sent, audio in hand
    joining = _Row(window_engine.job(hello, stream=True), RequestHandle("joining", None))
    joining.codes = [np.full(16, i % 2048) for i in range(4)]
    with mock.patch.object(scheduler, "_rows", [playing]):
        first = scheduler._windows_due(now=10.01)  # frames 4 to 8, due when the 4 sent have played
    playing.codes += [np.full(16, i % 2048) for i in range(8, 16)]
    with mock.patch.object(scheduler, "_rows", [playing, joining]):
        second = scheduler._windows_due(now=10.02)  # frames 8 to 16 and the new stream's first window
    assert [len(w) for w in (first, second)] == [1, 2]
    assert first[0].deadline == pytest.approx(10.0 + 4 * frame)
    assert min(w.deadline for w in second) < first[0].deadline  # the unit's most urgent window is due first

    source = scheduler.decoder
    decoder = ChunkDecoder(source.decoder, source.samples_per_frame, torch.device("cpu"), threaded=True)
    heard: list[tuple[str, int]] = []

    class Handle:
        end = None

        def __init__(self, name: str) -> None:
            self.name = name

        def _put(self, audio: np.ndarray) -> None:
            heard.append((self.name, len(audio) // SPF))

    names = {id(playing.handle): Handle("playing"), id(joining.handle): Handle("joining")}
    busy, release, drained = threading.Event(), threading.Event(), threading.Event()
    decoder.put([Ending(Handle("busy"), lambda: (busy.set(), release.wait(30)))], STREAM)
    assert busy.wait(30)
    for windows in (first, second):
        decoder.put([replace(w, handle=names[id(w.handle)]) for w in windows], STREAM)
    decoder.put([Ending(Handle("last"), drained.set)], WHOLE_FILE)
    release.set()
    assert drained.wait(60)
    assert [chunk for chunk in heard if chunk[0] == "playing"] == [("playing", 4), ("playing", 8)]
    assert ("joining", 4) in heard
    for handle in names.values():
        handle.end = "done"  # ended without an Ending reaching the queue (as a cancelled or failed request)
    decoder.put([Ending(Handle("after"), lambda: None)], STREAM)
    assert decoder._last_key == {}


@pytest.mark.parametrize("decoder", ["stateful", "window"])
def test_random_arrivals_of_streams_and_files_with_cancellations_keep_every_request_exact(
    engine: TTSEngine, window_engine: TTSEngine, reference, decoder: str
) -> None:
    """Mixed traffic as a room of clients makes it: streams and whole files of every length arriving at random
        moments, some hung up after their second chunk. Every request that is not cancelled gets its own codes
        and its audio, in order. (With the chunk-swap defect put back, this failed 2 runs in 3 with one extra core
    busy; the deterministic test above pins that defect down.)"""
    engine = engine if decoder == "stateful" else window_engine
    rng = random.Random(20261205)  # a fixed mix: the timing still varies from run to run
    results: dict[str, tuple[RequestHandle, list[np.ndarray]]] = {}

    def client(request_id: str, request: SynthesisRequest, stream: bool, delay: float, hang_up: bool) -> None:
        time.sleep(delay)
        handle = engine.submit(request, request_id, stream=stream)
        chunks = []
        for count, chunk in enumerate(handle, 1):
            chunks.append(chunk)
            if hang_up and count == 2:
                engine.cancel(request_id)
        results[request_id] = (handle, chunks)

    for round_ in range(3):
        plan = {
            f"mix-{decoder}-{round_}-{index}": (
                rng.choice(REQUESTS),
                rng.random() < 0.6,
                rng.uniform(0, 0.3),
                rng.random() < 0.2,
            )
            for index in range(10)
        }
        threads = [threading.Thread(target=client, args=(request_id, *item)) for request_id, item in plan.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for request_id, (request, stream, _, hang_up) in plan.items():
            assert request_id in results, "a request never ended"
            handle, chunks = results[request_id]
            assert handle.end is not None and handle.end.error is None
            if handle.end.cancelled:
                assert hang_up
                continue
            ref_codes, ref_audio = reference[request.text]
            np.testing.assert_array_equal(handle.end.codes, ref_codes)
            _check_audio(_as_pcm16(chunks), ref_audio, [])
            assert len(chunks) > 1 or not stream or len(ref_codes) <= 4
