"""One error type for every refusal, and one body builder per API family.

Plain routes answer `{"error": message, "detail": [{"loc", "msg", "type", "allowed"?}]}`, the shape of
BentoML's own errors. OpenAI's routes (`/v1/audio/...`, `/v1/models`) answer OpenAI's
`{"error": {"message", "type", "param", "code"}}`, which its SDKs parse. Routes, the request guards
and the WAV API all raise `ServiceError`, and only this module turns one into a body.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tts_service.audio import MAX_SPEED, MIN_SPEED

logger = logging.getLogger(__name__)

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Choices = Callable[[str, str], Awaitable[Sequence[str] | None]]  # (field, path) -> the values it takes
OPENAI_ERROR_KINDS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
STATUS_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "overloaded",
    500: "internal",
    503: "unavailable",
}


def is_openai_route(path: str) -> bool:
    return path.startswith("/v1/audio/") or path == "/v1/models"


@dataclass(frozen=True)
class Problem:
    """What is wrong with one field (`field` None: the request as a whole)."""

    field: str | None
    message: str
    code: str
    allowed: list[str] | None = None


@dataclass
class ServiceError(Exception):
    """A refusal or a failure, answered in the shape of the route's clients."""

    status: int
    message: str
    problems: list[Problem] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if not self.problems:
            self.problems = [Problem(None, self.message, STATUS_CODES.get(self.status, str(self.status)))]

    @classmethod
    def invalid(cls, field_name: str, message: str, allowed: Sequence[str] | None = None) -> ServiceError:
        """A 400 naming the field and, where there is a list, the allowed values."""
        allowed = list(allowed) if allowed is not None else None
        return cls(
            400, f"invalid {field_name}: {message}", [Problem(field_name, message, f"invalid_{field_name}", allowed)]
        )

    @classmethod
    def overloaded(cls, retry_after_s: int) -> ServiceError:
        message = f"the service is busy; retry after {retry_after_s} s"
        return cls(429, message, headers={"Retry-After": str(retry_after_s)})

    @classmethod
    def failed(cls, request_id: str, what: str = "synthesis failed") -> ServiceError:
        return cls(500, f"{what} (request id {request_id})", headers={"X-Request-ID": request_id})

    @classmethod
    def from_validation(cls, errors: Sequence[Mapping[str, Any]], openai: bool = False) -> ServiceError:
        """pydantic's (or FastAPI's) errors as one 400 naming each field."""
        problems = [_problem(error, openai) for error in errors] or [Problem(None, "invalid request", "invalid_body")]
        if problems[0].code == "invalid_json":
            return cls(400, problems[0].message, problems[:1])
        summary = "; ".join(f"{p.field or 'body'}: {p.message}" for p in problems)
        return cls(400, f"invalid {summary}" if len(problems) == 1 else f"invalid request: {summary}", problems)

    def plain_body(self) -> dict[str, Any]:
        detail = []
        for p in self.problems:
            item: dict[str, Any] = {"loc": [p.field] if p.field else [], "msg": p.message, "type": p.code}
            if p.allowed is not None:
                item["allowed"] = p.allowed
            detail.append(item)
        return {"error": self.message, "detail": detail}

    def openai_body(self) -> dict[str, Any]:
        first = self.problems[0]
        kind = OPENAI_ERROR_KINDS.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        message = first.message if first.field is None else f"invalid '{first.field}': {first.message}"
        if self.status != 400:
            message = self.message
        return {"error": {"message": message, "type": kind, "param": first.field, "code": first.code}}

    def body(self, path: str) -> dict[str, Any]:
        return self.openai_body() if is_openai_route(path) else self.plain_body()

    def log(self, method: str, path: str) -> None:
        """A client's mistake is one line at INFO; only our own failures are errors."""
        level = logging.ERROR if self.status >= 500 else logging.INFO
        logger.log(level, "%s %s -> %d: %s", method, path, self.status, self.message)


async def with_choices(
    errors: Sequence[Mapping[str, Any]], path: str, choices: Choices | None
) -> list[Mapping[str, Any]]:
    """pydantic's `errors`, where a missing field takes one of a list of values (`choices`) with the list
    added: a request without a speaker is told the speakers, as one with an unknown speaker is."""
    enriched = list(errors)
    for index, error in enumerate(enriched):
        name = _field_name(error)
        if choices is None or error.get("type") != "missing" or not name:
            continue
        if values := await choices(name, path):
            ctx = {**(error.get("ctx") or {}), "allowed": list(values)}
            enriched[index] = {**error, "msg": f"{error.get('msg')}; allowed: {', '.join(values)}", "ctx": ctx}
    return enriched


def _field_name(error: Mapping[str, Any]) -> str | None:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    return loc[0] if loc else None


def _problem(error: Mapping[str, Any], openai: bool) -> Problem:
    field_name = _field_name(error)
    kind = str(error.get("type", ""))
    message = str(error.get("msg", "invalid value"))
    if kind in ("json_invalid", "json_type"):
        return Problem("body", f"request body is not valid JSON: {message}", "invalid_json")
    if kind == "model_attributes_type" or (not field_name and kind == "model_type"):
        fields = "'model', 'input' and 'voice'" if openai else "'text' and 'speaker'"
        return Problem("body", f"the body must be a JSON object with {fields}", "invalid_body")
    name = field_name or "body"
    if openai and name == "voice" and kind != "missing":
        message = "must be a voice name (a string) or an object with an 'id'"
    elif name == "speed":
        message = f"{message}; allowed: {MIN_SPEED} to {MAX_SPEED}"
    expected = (error.get("ctx") or {}).get("expected")  # a Literal's values: "'wav' or 'pcm'"
    allowed = (
        [v.strip(" '") for v in re.split(r",| or ", expected) if v.strip(" '")] if isinstance(expected, str) else None
    )
    allowed = (error.get("ctx") or {}).get("allowed", allowed)
    return Problem(name, message, f"invalid_{name}", allowed)


def error_response(error: ServiceError, path: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(path), status_code=error.status, headers=error.headers)


async def send_error(scope: MutableMapping[str, Any], send: Send, error: ServiceError) -> None:
    """The same body, sent from ASGI middleware (guards that answer before any route)."""
    path = scope.get("path", "")
    error.log(scope.get("method", ""), path)
    payload = json.dumps(error.body(path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _routed(app: Any, path: str, method: str) -> bool:
    """Whether a route of `app` takes `method` on `path` (asked through each route's own `matches`, since
    FastAPI keeps included routers as opaque entries)."""
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "root_path": "", "method": method}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def method_not_allowed(method: str, path: str, allow: str) -> str:
    return f"method {method} is not allowed on {path}; allowed: {allow or 'none'}"


def install_error_handlers(app: Any, choices: Choices | None = None) -> None:
    """Every error FastAPI or a route raises, answered by this module in the route's shape. `choices`
    gives the values a required field takes on a path, if it has a list (None otherwise)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def service_error(request: Any, exc: ServiceError) -> Any:
        exc.log(request.method, request.url.path)
        return error_response(exc, request.url.path)

    async def validation_error(request: Any, exc: RequestValidationError) -> Any:
        path = request.url.path
        errors = await with_choices(exc.errors(), path, choices)
        return await service_error(request, ServiceError.from_validation(errors, is_openai_route(path)))

    async def http_error(request: Any, exc: HTTPException) -> Any:
        headers, message = dict(exc.headers or {}), str(exc.detail)
        if exc.status_code == 405:  # every method of the path, not just those of the first route matched
            path = request.url.path
            headers["Allow"] = ", ".join(m for m in HTTP_METHODS if _routed(app, path, m))
            message = method_not_allowed(request.method, path, headers["Allow"])
        field_name = "body" if exc.status_code == 400 else None
        code = f"invalid_{field_name}" if field_name else STATUS_CODES.get(exc.status_code, str(exc.status_code))
        problem = Problem(field_name, message, code)
        return await service_error(request, ServiceError(exc.status_code, message, [problem], headers))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)


def openapi_errors(statuses: Iterable[int], openai: bool) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries for the error statuses a route sends, with the route's body."""
    from tts_service.openai_api import OpenAIErrorResponse
    from tts_service.schemas import ErrorResponse

    model = OpenAIErrorResponse if openai else ErrorResponse
    return {status: {"model": model} for status in statuses}
