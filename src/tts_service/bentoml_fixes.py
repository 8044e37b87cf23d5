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
   False instead, and `AnswerInJson` makes any route that fails before answering get a 500 at once.

3. Plain-text router errors. BentoML mounts the FastAPI app passively (only paths it has), so its own
   router answers a path no route has (404) and a method an `@bentoml.api` route lacks (405) as
   `text/plain` "Not Found", where every other refusal of the service is JSON in the route's shape
   (OpenAI's for `/v1/audio/...`). `AnswerInJson` gives those two the service's JSON body.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from typing import Any

from tts_service.errors import ServiceError, method_not_allowed, send_error
from tts_service.security import ASGIApp, Message, Receive, Scope, Send, header

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


class AnswerInJson:
    """Every request gets the service's JSON answer where BentoML would give none or plain text: a route
    that raises before answering gets a 500 at once, not a 300 s hang (defect 2), and the router's own
    plain-text 404 and 405 become the service's error body, Allow kept (defect 3)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        held: Message | None = None  # the router's plain-text start, replaced once its body has gone by

        async def answer(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                content_type = header(message, b"content-type") or ""
                if message["status"] in (404, 405) and content_type.startswith("text/plain"):
                    held = message
                    return
            if held is None:
                await send(message)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send_error(scope, send, _router_error(scope, held))

        try:
            await self.app(scope, receive, answer)
        except Exception:
            if started:
                raise
            logger.exception("%s %s failed before answering", scope.get("method"), scope.get("path"))
            await send_error(scope, send, ServiceError(500, "internal error; the server log has the details"))


def _router_error(scope: Scope, start: Message) -> ServiceError:
    path, method = scope.get("path", ""), scope.get("method", "")
    if start["status"] == 404:
        return ServiceError(404, f"no such route: {path}")
    allow = header(start, b"allow") or ""
    return ServiceError(405, method_not_allowed(method, path, allow), headers={"Allow": allow})
