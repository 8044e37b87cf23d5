"""Work-arounds for defects of the pinned BentoML (1.4.39), each found by a measurement here.

1. Inter-service session recycling: BentoML's aiohttp client for a dependency (`bentoml.depends`)
   replaces its session after every 100 requests or 300 s and closes the old one at once, aborting
   every request still in flight on it (HTTP 500 for the client while the synthesizer still does the
   work; `scripts/bench.py service` showed 3 of 32 requests failing on the 101st call). The service
   talks to its own synthesizer over a local socket, so recycling is turned off.

2. Readiness probes that never answer. The entry service's `/readyz` asks each dependency
   `is_ready(5)`, which catches only `aiohttp.ServerTimeoutError`; while the synthesizer is busy the
   5 s budget ends in a plain `asyncio.TimeoutError` that escapes the route. BentoML's
   `TimeoutMiddleware` then waits for a response that never comes, for the whole request timeout
   (300 s), and the pending request keeps uvicorn from finishing a graceful shutdown: after SIGTERM
   the entry worker was left running, orphaned. `quiet_readiness_probe` makes the probe answer
   False instead, and `AnswerOnCrash` makes any route that fails before answering get a 500 at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from typing import Any

from tts_service.errors import ServiceError, send_error
from tts_service.security import ASGIApp, Message, Receive, Scope, Send

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


def quiet_readiness_probe(proxy: Any) -> None:
    """Make `proxy.is_ready(timeout)` return False on any failure, within its timeout, instead of raising."""
    probe = proxy.is_ready

    async def is_ready(timeout: float | None = None) -> bool:
        try:
            return bool(await asyncio.wait_for(probe(timeout), timeout=(timeout or 5) + 1))
        except Exception as exc:  # a timeout, a refused connection, a worker that is restarting
            logger.debug("dependency not ready: %s: %s", type(exc).__name__, exc)
            return False

    proxy.is_ready = is_ready


class AnswerOnCrash:
    """A route that raises before it has answered gets a 500 at once, not a 300 s hang (defect 2)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def track(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, track)
        except Exception:
            if started:
                raise
            logger.exception("%s %s failed before answering", scope.get("method"), scope.get("path"))
            await send_error(scope, send, ServiceError(500, "internal error; the server log has the details"))
