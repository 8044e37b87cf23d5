"""ASGI guards in front of every route: optional API keys, a request-size limit, JSON-only bodies.

Plain ASGI (no BentoML imports), so they are testable alone and sit outside the routes' own parsing.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Liveness and readiness stay open so that orchestrators and health checks need no key.
OPEN_PATHS = frozenset({"/health", "/livez", "/readyz", "/healthz"})
JSON_TYPES = ("application/json",)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def is_openai_route(path: str) -> bool:
    return path.startswith("/v1/audio/") or path == "/v1/models"


async def send_error(
    scope: Scope, send: Send, status: int, message: str, param: str | None = None, headers: Iterable = ()
) -> None:
    """An error in the shape the route's clients parse: OpenAI's for OpenAI routes, ours elsewhere."""
    if is_openai_route(scope.get("path", "")):
        kinds = {401: "authentication_error", 429: "rate_limit_error"}
        kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": str(status)}}
    else:
        body = {"error": message, "detail": [{"loc": [param] if param else [], "msg": message, "type": str(status)}]}
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but health and readiness; CORS preflights pass."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys if key]

    def authorized(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("bearer "):
            return False
        given = header[7:].strip().encode()
        # Compare with every key, without stopping early, so timing tells nothing about which matched.
        matches = [hmac.compare_digest(given, key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys
            or scope.get("method") == "OPTIONS"
            or scope.get("path") in OPEN_PATHS
            or self.authorized(_header(scope, b"authorization"))
        ):
            await self.app(scope, receive, send)
            return
        await send_error(
            scope,
            send,
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers=[("www-authenticate", "Bearer")],
        )


class RequestGuardMiddleware:
    """415 for POST bodies that are not JSON; 413 for bodies over `max_body_bytes`, declared or streamed.

    Only on `json_routes`: a POST elsewhere goes on to the router, which answers 405 or 404.
    The body is read here first (it is small by then) and replayed to the app, so an oversized chunked
    body is refused before any route starts on it.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, json_routes: Iterable[str]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.json_routes = frozenset(json_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.json_routes:
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type not in JSON_TYPES:
            shown = content_type or "none"
            await send_error(scope, send, 415, f"Content-Type must be application/json, got {shown}", "content-type")
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._too_large(scope, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads see the disconnect, as they would without this guard

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        await send_error(scope, send, 413, f"request body is larger than {self.max_body_bytes} bytes", "body")
