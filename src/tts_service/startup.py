"""Start-up: logging, and stopping the whole server when the model cannot be loaded.

BentoML's process manager respawns a worker whose start-up fails, forever, printing a traceback each
time. A model that cannot load will not load on the next try either, so the synthesizer worker logs
one clear message and asks its parent `bentoml serve` process to shut down; a container then exits
and its restart policy (not a tight loop) decides what happens next.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from typing import NoReturn

import psutil

from tts_service.model_source import ModelLoadError, check_model_source

logger = logging.getLogger(__name__)
STOP_SIGNAL = signal.SIGTERM


def abort_serving(message: str) -> NoReturn:
    logger.error("TTS service cannot start: %s", message)
    try:
        parent = psutil.Process(os.getppid())
        cmdline = " ".join(parent.cmdline())
    except psutil.Error:
        cmdline = ""
    # Only ever signal a BentoML server, never e.g. a test runner that imported the service.
    if "bentoml" in cmdline and " serve" in cmdline:
        logger.error("stopping the server (pid %d)", parent.pid)
        os.kill(parent.pid, STOP_SIGNAL)
    os._exit(1)  # no traceback: the message above is the whole story


def preflight(models: dict[str, str | None]) -> None:
    """In the `bentoml serve` command itself, refuse to start with a model that cannot load
    (`models`: each model setting's name and value)."""
    argv = sys.argv
    if not (argv and "bentoml" in os.path.basename(argv[0]) or argv[0].endswith("bentoml/__main__.py")):
        return
    if "serve" not in argv[1:2]:
        return  # `bentoml build` and friends import the service without serving it
    try:
        for setting, model in models.items():
            if model:
                check_model_source(model, setting=setting)
    except ModelLoadError as exc:
        raise SystemExit(f"TTS service cannot start: {exc}") from None


def configure_logging(level: str, process: str = "pid %(process)d") -> None:
    """Our loggers' handler: BentoML configures only its own, and each worker process imports the service.
    Each line names its process (`process`), so the lines of several workers and their decoder
    processes can be told apart on the one console."""
    root = logging.getLogger("tts_service")
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [%(levelname)s] [%(name)s] [{process}] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def freeze_loaded_objects(what: str) -> None:
    """Move every object alive after start-up (modules, torch, the model) out of the garbage collector's
    reach. Otherwise a full collection walks them all with the GIL held: about 270,000 objects and 100 to
    150 ms in the front service while it imported torch (it stalled about the 11th request after a start
    by that long; 136,000 since), 550,000 and 300 ms in the synthesizer (every stream of the engine loop
    at once). Collected first, so no garbage is frozen."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info(
        "%s: %d start-up objects frozen out of garbage collection (%.0f ms)",
        what,
        gc.get_freeze_count(),
        1000 * (time.perf_counter() - started),
    )
