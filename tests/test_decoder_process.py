"""The speech decoder in its own process (TTS_DECODER_WORKER=process, the CPU default): the same audio as
decoding in this process, failures that stay with their request, restarts, and no orphan child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tts_service.chunk_decoder import ChunkDecoder, Window
from tts_service.decoder_process import _CHILD_MAIN, DecoderProcess, DecoderProcessError, LostStates
from tts_service.engine import SynthesisRequest, TTSEngine
from tts_service.settings import Settings
from tts_service.streaming_decoder import StreamingDecoder

CODES = np.random.default_rng(7).integers(0, 2048, size=(40, 16), dtype=np.int64)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has exited
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def speech_decoder(engine: TTSEngine) -> torch.nn.Module:
    return engine.model.model.speech_tokenizer.model.decoder


@pytest.fixture()
def worker(speech_decoder: torch.nn.Module):
    process = DecoderProcess(speech_decoder)
    yield process
    process.close()


def test_the_engine_decodes_in_a_child_process_on_the_cpu(engine: TTSEngine) -> None:
    worker = engine.scheduler.decoder.worker
    assert worker is not None and worker.pid != os.getpid()
    result = engine.synthesize(SynthesisRequest("Hello there.", "ryan", "english"))
    assert result.num_samples > 0 and np.abs(result.audio).max() > 0


def test_its_audio_equals_decoding_in_this_process(worker: DecoderProcess, speech_decoder: torch.nn.Module) -> None:
    local = StreamingDecoder(speech_decoder)
    state, remote = local.new_state(), worker.new_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child (and the decoder thread) run: the same kernels, the same bytes
    try:
        _compare(worker, speech_decoder, local, state, remote)
    finally:
        torch.set_num_threads(threads)


def _compare(worker, speech_decoder, local, state, remote) -> None:
    with torch.inference_mode():
        for start, end in ((0, 4), (4, 20), (20, 40)):  # a stream's chunks, state carried
            expected = local.decode(state, torch.from_numpy(CODES[None, start:end]).transpose(1, 2)).numpy()
            np.testing.assert_array_equal(worker.decode_stateful(remote, CODES[start:end]), expected)
        # Two more streams decoded as one batch in the child, each with its own history: the same bytes.
        states, remotes = [local.new_state(), local.new_state()], [worker.new_state(), worker.new_state()]
        for start, end in ((0, 8), (8, 16)):
            chunks = [CODES[start:end], CODES[start + 20 : end + 20]]
            expected = local.decode_many(states, torch.from_numpy(np.stack(chunks)).transpose(1, 2)).numpy()
            np.testing.assert_array_equal(worker.decode_stateful_many(remotes, chunks), expected)
        windows = [CODES[:25], CODES[10:35]]  # whole windows, batched
        expected = speech_decoder(torch.from_numpy(np.stack(windows)).transpose(1, 2)).squeeze(1).numpy()
    np.testing.assert_array_equal(worker.decode(windows), expected)


def test_a_failing_decode_fails_alone_and_the_child_goes_on(worker: DecoderProcess) -> None:
    with pytest.raises(DecoderProcessError, match="IndexError"):
        worker.decode([np.full((8, 16), 99_999, dtype=np.int64)])  # outside the codebooks
    pid = worker.pid
    assert worker.decode([CODES[:8]]).shape[-1] > 0
    assert worker.pid == pid


def test_a_child_killed_mid_call_fails_that_call_and_its_streams(worker: DecoderProcess) -> None:
    stream = worker.new_state()
    worker.decode_stateful(stream, CODES[:4])
    old = worker.pid
    os.kill(old, signal.SIGSTOP)  # the next call is surely in flight when the child dies
    failure: list[BaseException] = []

    def call() -> None:
        try:
            worker.decode_stateful(stream, CODES[4:8])
        except BaseException as exc:  # noqa: BLE001 - checked below
            failure.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)
    os.kill(old, signal.SIGKILL)
    caller.join(timeout=30)
    assert not caller.is_alive()
    assert isinstance(failure[0], DecoderProcessError) and "exited" in str(failure[0])
    with pytest.raises(DecoderProcessError, match="lost"):  # the stream's state died with the child
        worker.decode_stateful(stream, CODES[8:12])
    fresh = worker.new_state()  # a new child serves everything else
    assert worker.decode_stateful(fresh, CODES[:4]).shape == (1, 4 * 1920)
    assert worker.pid != old
    # In a batch, the lost state is named before anything is sent; the others' histories are untouched.
    with pytest.raises(LostStates) as lost:
        worker.decode_stateful_many([fresh, stream], [CODES[4:8], CODES[8:12]])
    assert lost.value.states == [stream]
    alone = worker.new_state()
    worker.decode_stateful(alone, CODES[:4])
    np.testing.assert_array_equal(worker.decode_stateful(fresh, CODES[4:8]), worker.decode_stateful(alone, CODES[4:8]))


def test_a_hung_child_is_killed_after_the_call_timeout_and_replaced(
    speech_decoder: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import tts_service.decoder_process as module

    worker = DecoderProcess(speech_decoder)  # started here, so its stderr is capfd's
    try:
        worker.wait_ready()
        monkeypatch.setattr(module, "_CALL_TIMEOUT_S", 1.5)
        old = worker.pid
        os.kill(old, signal.SIGSTOP)  # alive but silent
        started = time.monotonic()
        with pytest.raises(DecoderProcessError, match="did not answer in 1.5 s"):
            worker.decode([CODES[:4]])
        assert time.monotonic() - started < 10
        assert not _alive(old)
        assert "in serve" in capfd.readouterr().err  # its stack was logged before it was killed
        assert worker.decode([CODES[:4]]).shape == (1, 4 * 1920)
        assert worker.pid != old
    finally:
        worker.close()


def test_a_batch_holding_a_lost_state_fails_that_stream_alone(
    worker: DecoderProcess, speech_decoder: torch.nn.Module
) -> None:
    """Windows of several streams go to the child as one call; when one stream's state died with an earlier
    child, that stream fails and the others in the batch are decoded as if it had not been there."""
    decoder = ChunkDecoder(speech_decoder, 1920, torch.device("cpu"), threaded=False, worker=worker)
    failed: list[str] = []
    decoder.on_error = lambda handle, error: failed.append(f"{handle.name}: {error}")

    class Handle:
        end = None

        def __init__(self, name: str) -> None:
            self.name, self.audio = name, []

        def _put(self, audio: np.ndarray) -> None:
            self.audio.append(audio)

    lost, kept = Handle("lost"), Handle("kept")
    lost_state = decoder.new_state()
    decoder._process([Window(lost, CODES[:4], 0, lost_state)])
    os.kill(worker.pid, signal.SIGKILL)
    time.sleep(0.2)
    kept_state = decoder.new_state()  # a stream that starts after the restart
    decoder._process([Window(lost, CODES[4:8], 0, lost_state), Window(kept, CODES[4:8], 0, kept_state)])
    assert failed == ["lost: this stream's decoder state was lost when the decoder process restarted"]
    assert len(lost.audio) == 1 and len(kept.audio) == 1
    np.testing.assert_array_equal(kept.audio[0], worker.decode_stateful(worker.new_state(), CODES[4:8])[0])


def test_collected_states_are_freed_in_the_child(worker: DecoderProcess) -> None:
    for _ in range(50):
        worker.decode_stateful(worker.new_state(), CODES[:2])  # each state is garbage at once
    assert worker.states_held() == 0
    kept = worker.new_state()
    worker.decode_stateful(kept, CODES[:2])
    assert worker.states_held() == 1


def test_the_engine_serves_on_after_its_decoder_process_is_killed(tiny_dir: Path, cache_dir: Path) -> None:
    engine = TTSEngine.load(Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu"))
    request = SynthesisRequest("Keep to the marked paths.", "vivian", "english")
    before = engine.synthesize(request)
    os.kill(engine.scheduler.decoder.worker.pid, signal.SIGKILL)
    time.sleep(0.2)
    after = engine.synthesize(request)
    np.testing.assert_array_equal(after.audio, before.audio)


def test_engines_whose_decoders_have_the_same_weights_share_one_child(engine: TTSEngine, cache_dir: Path) -> None:
    """A service's models ship one speech tokenizer: its engines share one decoder process (one copy of
    torch, about 0.5 GB), and a decoder with other weights gets its own."""
    import copy
    import gc

    from tts_service.decoder_process import decoder_process_for
    from tts_service.dev.tiny_checkpoint import ensure_tiny_checkpoint

    design = TTSEngine.load(
        Settings(model=str(ensure_tiny_checkpoint(cache_dir, kind="voice_design")), cache_dir=cache_dir, device="cpu")
    )
    shared = engine.scheduler.decoder.worker
    assert design.scheduler.decoder.worker is shared  # the tiny kinds share their tokenizer, as the released do
    instructed = design.synthesize(SynthesisRequest("Mind the gap.", "", "english", instruct="A calm voice."))
    assert instructed.audio.size > 0 and np.abs(instructed.audio).max() > 0

    other = copy.deepcopy(engine.model.model.speech_tokenizer.model.decoder)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    alone = decoder_process_for(other)
    try:
        assert alone is not shared and alone.pid != shared.pid
        alone.wait_ready()
        codes = [CODES[:4]]
        assert not np.array_equal(alone.decode(codes), shared.decode(codes))  # its own weights
        pid = alone.pid
    finally:
        del alone
    gc.collect()  # the last engine holding a child lets it go: the child stops
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid) and _alive(shared.pid)


def test_thread_mode_gives_the_same_bytes(engine: TTSEngine, tiny_dir: Path, cache_dir: Path) -> None:
    threaded = TTSEngine.load(
        Settings(model=str(tiny_dir), cache_dir=cache_dir, greedy=True, device="cpu", decoder_worker="thread")
    )
    assert threaded.scheduler.decoder.worker is None
    request = SynthesisRequest("The museum opens at nine.", "serena", "english")
    assert threaded.synthesize(request).wav == engine.synthesize(request).wav


def _withhold_weights(monkeypatch: pytest.MonkeyPatch, children: int) -> None:
    """The first `children` children never get their decoder: they hang where a stuck start would."""
    import tts_service.decoder_process as module

    real, withheld = module._send_quietly, iter(range(children))

    def send(conn: object, payload: bytes) -> None:
        if next(withheld, None) is None:
            real(conn, payload)

    monkeypatch.setattr(module, "_send_quietly", send)


def test_a_child_hung_while_starting_shows_its_stacks_and_is_replaced(
    speech_decoder: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import tts_service.decoder_process as module

    _withhold_weights(monkeypatch, 1)
    monkeypatch.setattr(module, "_READY_TIMEOUT_S", 3.0)
    real_start = DecoderProcess._start

    def start(self: DecoderProcess) -> None:  # the replacement gets all the time a loaded machine needs
        if self._incarnation:
            monkeypatch.setattr(module, "_READY_TIMEOUT_S", 300.0)
        real_start(self)

    monkeypatch.setattr(DecoderProcess, "_start", start)
    worker = DecoderProcess(speech_decoder)
    try:
        hung = worker.pid
        worker.wait_ready()
        assert worker.pid != hung and not _alive(hung)
        assert worker.decode([CODES[:4]]).shape == (1, 4 * 1920)
    finally:
        worker.close()
    assert "did not start in 3 s and was killed (its stacks are logged above)" in caplog.text
    stacks = capfd.readouterr().err
    # The hung child's threads, wherever 3 s found it (importing, or waiting for its weights in serve):
    assert "Current thread" in stacks and "(most recent call first)" in stacks, stacks


def test_start_up_gives_up_after_two_children_hang(
    speech_decoder: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tts_service.decoder_process as module

    _withhold_weights(monkeypatch, 2)
    monkeypatch.setattr(module, "_READY_TIMEOUT_S", 2.0)
    worker = DecoderProcess(speech_decoder)
    try:
        with pytest.raises(DecoderProcessError, match="did not start in 2 s"):
            worker.wait_ready()
        assert worker._incarnation == 2
    finally:
        worker.close()


def test_the_child_dies_with_its_parent(tiny_dir: Path, cache_dir: Path) -> None:
    script = (
        "import sys, time\n"
        "from tts_service.engine import TTSEngine\n"
        "from tts_service.settings import Settings\n"
        f"e = TTSEngine.load(Settings(model={str(tiny_dir)!r}, cache_dir={str(cache_dir)!r}, device='cpu'))\n"
        "e.scheduler.decoder.wait_ready()\n"
        "print(e.scheduler.decoder.worker.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()  # no clean-up runs: the kernel's parent-death signal must end the child
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        parent.kill()


def test_a_child_whose_parent_goes_away_during_its_start_exits_quietly() -> None:
    """A process that loads an engine and exits within seconds (a script, a short test run) closes its end
    of the socket before the child has started: the child exits with status 0 and no traceback."""
    import socket

    ours, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_MAIN, str(theirs.fileno()), str(os.getpid())],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    ours.close()  # before the child could read its decoder
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 0 and "Traceback" not in stderr, stderr
