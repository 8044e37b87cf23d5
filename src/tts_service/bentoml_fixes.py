"""Work-arounds for defects of the pinned BentoML (1.4.39), each found by a measurement here.

Inter-service session recycling: BentoML's aiohttp client for a dependency (`bentoml.depends`) replaces
its session after every 100 requests or 300 s and closes the old one at once, aborting every request
still in flight on it. Each aborted request fails with `ServerDisconnectedError` and the client gets
an HTTP 500, while the synthesizer still does the work. `scripts/bench.py service` showed exactly this:
3 of 32 requests failed at 4 concurrent clients, on the 101st call. The service talks to its own
synthesizer over a local socket, so there is nothing to gain from recycling; it is turned off.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

logger = logging.getLogger(__name__)


def keep_dependency_sessions(proxy: Any) -> bool:
    """Stop `proxy`'s (a `bentoml.depends` client) periodic session replacement; False if not found."""
    manager = getattr(getattr(proxy, "_async", None), "_session_manager", None)
    if manager is None or not hasattr(manager, "max_requests") or not hasattr(manager, "max_age"):
        logger.warning("BentoML's client session manager was not found; in-flight calls may fail on recycling")
        return False
    manager.max_requests = sys.maxsize
    manager.max_age = math.inf
    return True
