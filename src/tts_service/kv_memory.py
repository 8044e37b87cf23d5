"""The memory the CPU's KV cache may take, shared by every engine of the process.

On the CPU the KV is memory the kernel hands out page by page as requests write it (`fs.untouched_zeros`),
and a slot's pages go back when its request leaves (`fs.release`). So a service starts whatever its KV's
full size, and what it holds follows its requests. A burst of long requests could still write more than
the machine has and meet the OOM killer, which takes the whole worker and every request in it. The engine
therefore claims a request's KV here before it joins: its prompt and frame budget, in whole pages. A
request that does not fit waits in the queue, as it would for a slot, until others leave. (On a GPU the KV
is allocated whole at start-up; nothing is claimed.)
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

# Left to everything else that grows after start-up: the decoder's process (it may still be loading its
# weights), the steps' activations, audio and HTTP buffers.
MARGIN_BYTES = 1 << 30
MARGIN_SHARE = 0.1


def available_memory(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes this process may still take: the machine's available memory, or less under a container's
    memory limit (cgroup v2), which psutil does not see."""
    available = psutil.virtual_memory().available
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


class KVMemory:
    """Bytes of KV claimed against a limit; thread-safe. One per process (`KV_MEMORY`), so that the engines of
    one service (speaking, cloning, designing) do not each count the same free memory as their own."""

    def __init__(self, limit: float = math.inf) -> None:
        self.limit = limit
        self.claimed = 0
        self._lock = threading.Lock()

    def claim(self, nbytes: int) -> bool:
        """Take `nbytes` if they fit beside what is claimed, or if nothing is (a request larger than the
        limit then runs alone rather than wait for ever)."""
        with self._lock:
            if self.claimed and self.claimed + nbytes > self.limit:
                return False
            self.claimed += nbytes
            return True

    def resize(self, old: int, new: int) -> None:
        """A request that holds its slot claims more (its next text segment) without waiting."""
        with self._lock:
            self.claimed += new - old

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.claimed -= nbytes

    def set_limit(self, setting_bytes: int | None, full_kv_bytes: int, slots: int, max_len: int) -> None:
        """At an engine's start: the limit is `setting_bytes` (TTS_KV_MEMORY_GB) if set, else the memory
        available now (what the loaded models left) less a margin, plus what is claimed already. Logs when
        this engine's every slot filled to its last position would not fit."""
        if setting_bytes is not None:
            limit = float(setting_bytes)
        else:
            available = available_memory()
            limit = available - max(MARGIN_BYTES, MARGIN_SHARE * available) + self.claimed
        with self._lock:
            self.limit = limit
        if full_kv_bytes > limit:
            logger.warning(
                "KV cache: %d slots of %d positions would take %.1f GB if every slot were filled, more than the "
                "%.1f GB it may take (%s); a request claims its prompt and frame budget as it joins, and waits "
                "while that would not fit (lower TTS_MAX_BATCH_SIZE or TTS_MAX_NEW_TOKENS to make a slot's most "
                "fit)",
                slots,
                max_len,
                full_kv_bytes / 1e9,
                limit / 1e9,
                "TTS_KV_MEMORY_GB" if setting_bytes is not None else "the memory available now, less a margin",
            )


KV_MEMORY = KVMemory()
