"""Start-up checks' verdicts kept on disk (in TTS_CACHE_DIR), so that a restart on the same machine does not
measure them again.

Why: the batch-invariance checks (batch_invariance.py) take 50 to 60 s at the released models' sizes on a
2-core CPU, most of it the speech decoder's (with its window lengths checked at once), longer than loading
the model. Their verdicts are a
property of the processor and of torch's build (its BLAS and oneDNN), not of the weights' values, so a
verdict is kept under a key of everything it depends on: the check's arguments, this machine's processor and
torch's build (`machine_fingerprint`), and the code that measures (`CHECK_SOURCES`). Any change to one of
them is a new key, measured afresh. Deleting the file makes the next start measure everything again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FILE_NAME = "start-up-verdicts.json"
# What /proc/cpuinfo says of the processor that can change which kernels run: x86 and Arm fields
CPU_FIELDS = (
    "vendor_id",
    "model name",
    "flags",
    "cache size",
    "Features",
    "CPU implementer",
    "CPU architecture",
    "CPU variant",
    "CPU part",
    "CPU revision",
)
# Settings that change which kernels the BLAS and oneDNN dispatch to
KERNEL_ENVIRONMENT = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
)
# The modules whose code measures the verdicts (and the decoder the decoder check runs)
CHECK_SOURCES = ("batch_invariance.py", "streaming_decoder.py")


@cache
def machine_fingerprint() -> str:
    """The processor, as /proc/cpuinfo names it (its first CPU's model, features and cache), and torch's
    build and kernel settings."""
    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() in CPU_FIELDS:
                cpu.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return json.dumps(
        {
            "machine": platform.machine(),
            "cpu": cpu or platform.processor(),
            "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(),
            "build": torch.__config__.show(),
            "environment": {name: os.environ.get(name) for name in KERNEL_ENVIRONMENT},
        },
        sort_keys=True,
    )


@cache
def checks_code() -> str:
    """A digest of the code that measures, so that a changed check is measured afresh."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in CHECK_SOURCES)).hexdigest()


class VerdictStore:
    """A JSON file of verdicts by key. Reading never fails a start (a missing, unreadable or damaged file
    reads as empty), nor does writing (logged); writes replace the file whole, so a crash leaves the old one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def key(self, check: str, arguments: Any) -> str:
        text = json.dumps([check, repr(arguments), machine_fingerprint(), checks_code()])
        return hashlib.sha256(text.encode()).hexdigest()

    def _read(self) -> dict[str, Any]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, check: str, arguments: Any, valid: Callable[[Any], bool]) -> dict[str, Any] | None:
        """The entry kept for `check` with these arguments on this machine (its "verdict", when and how
        long it was measured), or None, also where its verdict is not one that `valid` accepts."""
        entry = self._read().get(self.key(check, arguments))
        return entry if isinstance(entry, dict) and "verdict" in entry and valid(entry["verdict"]) else None

    def put(self, check: str, arguments: Any, verdict: Any, seconds: float) -> None:
        entries = self._read()
        entries[self.key(check, arguments)] = {
            "check": check,
            "verdict": verdict,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 2),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".verdicts-")
        except OSError as exc:
            logger.warning("could not keep a start-up check's verdict in %s: %s", self.path, exc)
            return
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(entries, out, indent=1)
            os.replace(temporary, self.path)
        except OSError as exc:
            logger.warning("could not keep a start-up check's verdict in %s: %s", self.path, exc)
            Path(temporary).unlink(missing_ok=True)
