"""ASGI guards in front of every route: optional API keys, and for JSON routes the body's type, size
and fields, checked against the route's pydantic model before any route (FastAPI's or BentoML's) reads
it, so every refusal has this service's error shape and logs one line.

Plain ASGI (no BentoML imports), so they are testable alone.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from pydantic import BaseModel, ValidationError

from tts_service.errors import Choices, Problem, ServiceError, is_openai_route, send_error, with_choices

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Liveness and readiness stay open so that orchestrators and health checks need no key.
OPEN_PATHS = frozenset({"/health", "/livez", "/readyz", "/healthz"})
JSON_TYPES = ("application/json",)


def header(scope: Scope | Message, name: bytes) -> str | None:
    """A header of a request's scope or a response's start message (lower-case `name`), or None."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def ignored_fields(body: bytes, model: type[BaseModel]) -> list[str]:
    """The top-level keys of a JSON object body that `model` neither names nor aliases (it ignores them),
    at most 20, each cut to 64 characters."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    known = set(model.model_fields)
    known |= {f.alias for f in model.model_fields.values() if f.alias}
    known |= {f.validation_alias for f in model.model_fields.values() if isinstance(f.validation_alias, str)}
    return sorted(key[:64] for key in data if key not in known)[:20]


def _with_header(send: Send, name: bytes, value: bytes) -> Send:
    """`send` with one more header on the response's start."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return sending


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
            or self.authorized(header(scope, b"authorization"))
        ):
            await self.app(scope, receive, send)
            return
        message = "missing or invalid API key: send 'Authorization: Bearer <key>'"
        await send_error(scope, send, ServiceError(401, message, headers={"WWW-Authenticate": "Bearer"}))


class RequestGuardMiddleware:
    """415 for POST bodies that are not JSON; 413 for bodies over `max_body_bytes`, declared or streamed;
    400 naming each field for bodies that do not fit the route's model. The routes of `upload_routes`
    also take multipart/form-data, up to their own byte limit (the form's fields are the route's to check).

    Only on the routes of `body_models`: a POST elsewhere goes on to the router (405 or 404). The body is
    read here first (it is bounded by then) and replayed to the app, so an oversized chunked body is
    refused before any route starts on it.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_models: Mapping[str, type[BaseModel]],
        upload_routes: Mapping[str, int] | None = None,
        choices: Choices | None = None,
    ) -> None:
        self.app = app
        self.choices = choices
        self.max_body_bytes = max_body_bytes
        self.body_models = dict(body_models)
        self.upload_routes = dict(upload_routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.body_models:
            await self.app(scope, receive, send)
            return
        content_type = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        upload = content_type == "multipart/form-data" and scope["path"] in self.upload_routes
        if content_type not in JSON_TYPES and not upload:
            wanted = "application/json" + (" or multipart/form-data" if scope["path"] in self.upload_routes else "")
            message = f"Content-Type must be {wanted}, got {content_type or 'none'}"
            await send_error(
                scope, send, ServiceError(415, message, [Problem("content-type", message, "invalid_content_type")])
            )
            return
        limit = self.upload_routes[scope["path"]] if upload else self.max_body_bytes
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, send, limit, "audio" if upload else "body")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._too_large(scope, send, limit, "audio" if upload else "body")
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        try:
            if not upload:
                self.body_models[scope["path"]].model_validate_json(body)
        except ValidationError as exc:
            errors = await with_choices(exc.errors(), scope["path"], self.choices)
            await send_error(scope, send, ServiceError.from_validation(errors, is_openai_route(scope["path"])))
            return

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads see the disconnect, as they would without this guard

        ignored = [] if upload else ignored_fields(body, self.body_models[scope["path"]])
        if ignored:  # a misspelt field must not pass unnoticed: said in a header and the log
            # JSON strings: printable ASCII (no newline or NUL in a header or a log line), commas quoted.
            names = ", ".join(json.dumps(name) for name in ignored)
            logger.info("%s: ignored fields not in the API: %s", scope["path"], names)
            send = _with_header(send, b"x-tts-ignored-fields", names.encode("ascii"))
        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send, limit: int, field: str) -> None:
        message = f"request body is larger than {limit} bytes"
        await send_error(scope, send, ServiceError(413, message, [Problem(field, message, "too_large")]))
