"""Make `/docs.json` tell the truth about error responses.

BentoML generates the OpenAPI document itself and offers no hook for an API's responses: it lists a
400 whose `detail` is a string (its own validation errors send a list) and knows nothing of the
guards (401, 413, 415), the queue bound (429) or our 500 with a request id. Swagger users, generated
clients and schemathesis read this document, so a small ASGI middleware rewrites it on the way out.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from tts_service.openai_api import OpenAIErrorResponse
from tts_service.schemas import ErrorResponse
from tts_service.security import OPEN_PATHS, ASGIApp, Message, Receive, Scope, Send

DOCS_PATH = "/docs.json"
SCHEMA_REFS = {"plain": "#/components/schemas/ErrorResponse", "openai": "#/components/schemas/OpenAIErrorResponse"}
HEADER_DOCS = {
    "Retry-After": "Seconds after which the queue is expected to have room.",
    "X-Request-ID": "Quote it when reporting the failure; the server log holds the traceback under it.",
    "WWW-Authenticate": "Always `Bearer`.",
}


def _error(description: str, shape: str, headers: Iterable[str] = ()) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": SCHEMA_REFS[shape]}}},
    }
    names = list(headers)
    if names:
        response["headers"] = {name: {"description": HEADER_DOCS[name], "schema": {"type": "string"}} for name in names}
    return response


def _components(schemas: dict[str, Any]) -> None:
    """Add both error bodies (with their nested models) to the document's components."""
    for model in (ErrorResponse, OpenAIErrorResponse):
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, schema in generated.pop("$defs", {}).items():
            schemas.setdefault(name, schema)
        schemas[model.__name__] = generated


def document_errors(
    spec: dict[str, Any],
    json_routes: Iterable[str],
    queued_routes: Iterable[str],
    api_keys: bool,
    audio_types: Iterable[str] = (),
) -> dict[str, Any]:
    """Return `spec` with the bodies and error responses each route really takes and sends."""
    spec = copy.deepcopy(spec)
    audio_types = list(audio_types)
    _components(spec.setdefault("components", {}).setdefault("schemas", {}))
    json_routes, queued_routes = set(json_routes), set(queued_routes)
    for path, operations in spec.get("paths", {}).items():
        shape = "openai" if path.startswith("/v1/audio/") or path == "/v1/models" else "plain"
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if shape == "openai":
                responses.pop("422", None)  # the OpenAI routes turn validation errors into 400s
                responses.pop("503", None)
            if "400" in responses or path in json_routes:
                responses["400"] = _error("Invalid field; the message names it and the allowed values.", shape)
            if "500" in responses or path in queued_routes:
                responses["500"] = _error("Synthesis failed.", shape, ["X-Request-ID"])
            if method == "post" and path in json_routes:
                if "requestBody" in operation:
                    operation["requestBody"]["required"] = True  # BentoML leaves it optional
                success = responses.get("200", {}).setdefault("content", {})
                for content_type in audio_types:  # every `format` the route can answer with
                    success.setdefault(content_type, {"schema": {"type": "string", "format": "binary"}})
                responses.pop("404", None)  # BentoML's generic entry; a route that exists never sends it
                responses["413"] = _error("The body is larger than TTS_MAX_BODY_BYTES.", shape)
                responses["415"] = _error("The body is not application/json.", shape)
            if path in queued_routes:
                responses["429"] = _error("More requests wait than TTS_MAX_QUEUE.", shape, ["Retry-After"])
            if api_keys and path not in OPEN_PATHS:
                responses["401"] = _error("Missing or wrong API key.", shape, ["WWW-Authenticate"])
                operation["security"] = [{"bearerAuth": []}]
    if api_keys:
        spec["components"].setdefault("securitySchemes", {})["bearerAuth"] = {"type": "http", "scheme": "bearer"}
    return spec


class OpenAPIDocsMiddleware:
    """Rewrites the body of `GET /docs.json` with `document_errors`."""

    def __init__(
        self,
        app: ASGIApp,
        json_routes: Iterable[str],
        queued_routes: Iterable[str],
        api_keys: bool,
        audio_types: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.options = {
            "json_routes": tuple(json_routes),
            "queued_routes": tuple(queued_routes),
            "api_keys": api_keys,
            "audio_types": tuple(audio_types),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != DOCS_PATH or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await finish()
            else:
                await send(message)

        async def finish() -> None:
            body = b"".join(chunks)
            if start.get("status") == 200:
                body = json.dumps(document_errors(json.loads(body), **self.options)).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)
