"""The speech decoder in a process of its own, for CPU serving.

On a CPU the decoder thread and the engine loop share the GIL, and both make thousands of small torch
calls: beside a decoding thread the frame step runs about 1.4x slower (`scripts/gil_contention.py`).
A child process decodes on the other core without touching the loop's GIL.

Engines whose decoders have the same weights (a service's models ship one speech tokenizer) share one
child (`decoder_process_for`). The child gets its own copy of the decoder (pickled by value: no shared
memory, so a container's small /dev/shm does not matter and a crash in the child cannot corrupt the
engine's weights). Stream states live in the child, keyed by a number; the parent's `RemoteState` frees
its key when it is collected.
If the child dies, the calls in flight fail (their requests end with an error), and the next call starts
a new child; requests whose state was in the old one fail too, every other request goes on. A child that
stays silent past its timeout prints its threads' stacks to the log before it is killed, and one that
hangs while starting is replaced once before start-up gives up.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# A child starts in about 2 s on an idle CPU and 12 s beside three others and two busy cores; one silent
# for this long from its spawn is hung. Start-up then shows its stacks, kills it and starts another once.
_READY_TIMEOUT_S = 90.0
_START_ATTEMPTS = 2
# One chunk takes milliseconds to seconds; a child silent for this long is hung: killed and restarted,
# so that one stuck decode cannot stall every later request's audio.
_CALL_TIMEOUT_S = 120.0
# The child prints every thread's Python stack to stderr (the server's log) on this signal, which is sent
# before a hung child is killed: the log then says where it hung.
_STACKS_SIGNAL = signal.SIGUSR1
# Run as the child: registers the stack dump before anything is imported (a child can hang importing).
_CHILD_MAIN = (
    "import faulthandler, runpy, signal;"
    f"faulthandler.register(signal.{_STACKS_SIGNAL.name}, all_threads=True);"
    f"runpy.run_module({__name__!r}, run_name='__main__', alter_sys=True)"
)


class DecoderProcessError(RuntimeError):
    """The decoder process failed a call (it exited, or its decode raised)."""


class LostStates(DecoderProcessError):
    """Some streams' states died with an earlier child. Raised before anything is sent, so the other
    states of the call are untouched and can be decoded without these."""

    def __init__(self, states: list[RemoteState]) -> None:
        super().__init__("this stream's decoder state was lost when the decoder process restarted")
        self.states = states


@dataclass(eq=False)
class RemoteState:
    """A stream's decoder state, held in the child under `key` (of the child started `incarnation`th)."""

    key: int
    incarnation: int
    used: bool = False  # has history in the child (a fresh state survives a restart)


class DecoderProcess:
    """Calls from one thread at a time (the chunk decoder's); each waits for its answer, which frees the
    GIL for the engine loop while the child works."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self._decoder = decoder  # pickled afresh for each child: no lasting copy of its weights here
        self._keys = itertools.count(1)
        self._dropped: collections.deque[int] = collections.deque()  # keys of collected states, sent next call
        self._lock = threading.Lock()
        self._incarnation = 0
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._start()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _start(self) -> None:
        """A plain `python -m` child on one end of a socket pair: unlike multiprocessing's spawn, it does
        not re-import the parent's main module, and a child that dies early cannot block the parent."""
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        process = subprocess.Popen(
            [sys.executable, "-c", _CHILD_MAIN, str(theirs.fileno()), str(os.getpid()), _log_level()],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        conn = Connection(ours.detach())
        self._incarnation += 1
        self._process, self._conn, self._ready = process, conn, False
        self._spawned = time.monotonic()
        self._dropped.clear()  # the old child's states died with it
        weakref.finalize(self, _stop, process, conn)
        # The weights go over the socket from a thread: start-up goes on while the child imports torch.
        payload = pickle.dumps(self._decoder, protocol=pickle.HIGHEST_PROTOCOL)
        threading.Thread(target=_send_quietly, args=(conn, payload), name="decoder-weights", daemon=True).start()

    def wait_ready(self, attempts: int = _START_ATTEMPTS) -> None:
        """Block until the child has loaded its decoder, at most `_READY_TIMEOUT_S` from its spawn; a child
        that hangs or dies while starting is replaced, up to `attempts` children in all. (Start-up calls
        this before reporting ready; a call after a restart waits for one child only, as its request
        should not wait for two.)"""
        for attempt in range(1, attempts + 1):
            if self._ready:
                return
            try:
                remaining = max(1.0, _READY_TIMEOUT_S - (time.monotonic() - self._spawned))
                reply = self._receive(remaining, f"did not start in {_READY_TIMEOUT_S:g} s")
            except DecoderProcessError:
                if attempt == attempts:
                    raise
                self._restart()
                continue
            if reply != ("ready",):
                raise DecoderProcessError(f"the decoder process did not start: {reply!r}")
            self._ready = True

    def new_state(self) -> RemoteState:
        state = RemoteState(next(self._keys), self._incarnation)
        weakref.finalize(state, self._dropped.append, state.key)
        return state

    def decode(self, codes: list[np.ndarray]) -> np.ndarray:
        """Equal-length code windows [T, 16] -> float32 audio [b, T * samples_per_frame]."""
        return self._call(("decode", codes))

    def decode_stateful(self, state: RemoteState, codes: np.ndarray) -> np.ndarray:
        """The next chunk of one stateful stream: [T, 16] -> float32 audio [1, T * samples_per_frame]."""
        return self.decode_stateful_many([state], [codes])

    def decode_stateful_many(self, states: list[RemoteState], codes: list[np.ndarray]) -> np.ndarray:
        """The next chunks of several streams, equal lengths [T, 16], as one batch -> [b, T * spf]."""
        keys = [state.key for state in states]
        return self._call(("stateful", keys, [np.ascontiguousarray(c) for c in codes]), states)

    def states_held(self) -> int:
        """How many stream states the child holds (after freeing those collected here): for leak tests."""
        return int(self._call(("states",)))

    def close(self) -> None:
        _stop(self._process, self._conn)

    # ---- one call ---------------------------------------------------------------------------------
    def _call(self, message: tuple, states: Sequence[RemoteState] = ()) -> np.ndarray:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._restart()
            lost = [state for state in states if state.used and state.incarnation != self._incarnation]
            if lost:
                raise LostStates(lost)
            for state in states:
                state.incarnation, state.used = self._incarnation, True
            self.wait_ready(attempts=1)
            dropped = [self._dropped.popleft() for _ in range(len(self._dropped))]
            try:
                self._conn.send((*message, dropped))
            except (OSError, EOFError) as exc:
                self._crashed(exc)
            kind, value = self._receive(_CALL_TIMEOUT_S)
            if kind == "error":
                raise DecoderProcessError(value)
            return value

    def _receive(self, timeout: float, silence: str = "") -> Any:
        """The child's next message; raises if it exits first (checked every second while waiting) or
        stays silent past `timeout` (then it is killed, and the error says `silence`)."""
        started = time.monotonic()
        while True:
            try:
                if self._conn.poll(min(1.0, timeout)):
                    return self._conn.recv()
            except (OSError, EOFError) as exc:
                self._crashed(exc)
            if self._process.poll() is not None:
                self._crashed(None)
            if time.monotonic() - started > timeout:
                self._show_stacks()
                self._process.kill()
                silence = silence or f"did not answer in {timeout:g} s"
                self._crashed(None, f"{silence} and was killed (its stacks are logged above)")

    def _show_stacks(self) -> None:
        """Have a silent child print its threads' stacks to the log before it is killed."""
        try:
            self._process.send_signal(_STACKS_SIGNAL)
            self._process.send_signal(signal.SIGCONT)  # a stopped child handles it only once continued
        except ProcessLookupError:
            return
        time.sleep(1.0)  # faulthandler writes from its signal handler: at once, unless the child is swapped out

    def _crashed(self, cause: BaseException | None, what: str = "exited") -> None:
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        logger.error("the decoder process (pid %s) %s (code %s); it restarts on the next call", self.pid, what, code)
        self._ready = False
        raise DecoderProcessError(f"the decoder process {what} (code {code})") from cause

    def _restart(self) -> None:
        logger.warning("starting a new decoder process")
        _stop(self._process, self._conn)
        self._start()


_running: weakref.WeakSet[DecoderProcess] = weakref.WeakSet()  # each alive while an engine holds it
_running_lock = threading.Lock()


def decoder_process_for(decoder: torch.nn.Module) -> DecoderProcess:
    """A child for `decoder`, shared with every engine of this process whose decoder has the same weights.
    A service's models (custom voice, clone, design) ship one speech tokenizer, and a child holds its own
    torch and qwen-tts: about 0.5 GB of memory that is not shared, and a second of CPU to start. Calls of
    several engines to one child run one at a time, as they would on its one thread anyway."""
    with _running_lock:
        for worker in _running:
            if _same_weights(worker._decoder, decoder):
                return worker
        worker = DecoderProcess(decoder)
        _running.add(worker)
        return worker


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    if first is second:
        return True
    ours, theirs = first.state_dict(keep_vars=True), second.state_dict(keep_vars=True)
    if type(first) is not type(second) or ours.keys() != theirs.keys():
        return False
    return all(ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]) for name in ours)


def _stop(process: subprocess.Popen | None, conn: Connection | None) -> None:
    if process is None or conn is None:
        return
    try:
        conn.close()  # the child's next receive ends its loop
    except OSError:
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _send_quietly(conn: Connection, payload: bytes) -> None:
    try:
        conn.send_bytes(payload)
    except (OSError, TypeError, ValueError):  # the child died first, or we were closed meanwhile
        pass


def _log_level() -> str:
    """Our loggers' level in this process, for the child's: its lines then show where ours do."""
    return logging.getLevelName(logging.getLogger("tts_service").getEffectiveLevel())


def _die_with(parent_pid: int) -> None:
    """Exit when the parent is gone, even mid-decode, so a killed worker leaves no orphan decoder. (Not
    PR_SET_PDEATHSIG: it fires when the parent's *thread* that started us ends, such as a loading thread.)"""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(conn: Connection, parent_pid: int, log_level: str = "INFO") -> None:
    """The child's loop: load the decoder sent first, then answer each call in order until the parent's
    end of the socket closes. It logs to stderr (a worker's, so the server's console) at the parent's level."""
    from tts_service.startup import configure_logging, freeze_loaded_objects

    configure_logging(log_level, process=f"decoder pid %(process)d of pid {parent_pid}")
    _die_with(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # the engine loop has the other core
    from tts_service.chunk_decoder import ChunkDecoder
    from tts_service.engine import import_qwen_tts

    import_qwen_tts()  # the decoder's classes, without qwen-tts's import banners
    decoder = pickle.loads(conn.recv_bytes()).eval()
    # The same decode calls the parent makes without a worker, so the audio is the same.
    local = ChunkDecoder(decoder, int(decoder.total_upsample), torch.device("cpu"), threaded=False)
    states: dict[int, Any] = {}
    freeze_loaded_objects("decoder process")
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind, *args, dropped = message
        for key in dropped:
            states.pop(key, None)
        try:
            if kind == "states":
                reply: Any = len(states)
            elif kind == "decode":
                reply = local.decode(args[0])
            else:
                keys, codes = args
                for key in keys:
                    if key not in states:
                        states[key] = local.new_state()
                reply = local.decode_stateful_many([states[key] for key in keys], codes)
            conn.send(("ok", reply))
        except Exception as exc:  # noqa: BLE001 - the request fails, the child goes on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    try:
        serve(Connection(int(sys.argv[1])), int(sys.argv[2]), *sys.argv[3:4])
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent went away (e.g. it exited while this child was starting): nobody is owed an answer
