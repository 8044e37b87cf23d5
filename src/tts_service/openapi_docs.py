"""The docs page at `/` and `/docs.json`, for this product rather than for BentoML.

BentoML generates both and offers no hook for what this module adds:
- the document's title, version, description (a quick start) and tags, where BentoML writes its own
  name, "None", Slack and Twitter links and badge images that a LAN cannot load;
- the statuses that the guards in front of every route send (401, 413, 415), the WAV API's own (400,
  429, 500) and the text limit, which is configuration (`TTS_MAX_TEXT_CHARS`);
- a Swagger page that loads only BentoML's bundled Swagger UI from this server: BentoML's own page
  also loads Google Tag Manager.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

from tts_service.app import DESCRIPTION, TAGS, TITLE
from tts_service.audio_responses import AUDIO_HEADERS
from tts_service.openai_api import OpenAIErrorResponse
from tts_service.schemas import ErrorResponse
from tts_service.security import OPEN_PATHS, ASGIApp, Message, Receive, Scope, Send

DOCS_PATH = "/docs.json"
PAGE_PATHS = ("/", "/index.html")
HEADER_DOCS = {
    "Retry-After": "Seconds after which the queue is expected to have room.",
    "X-Request-ID": "This request's id. Quote it when reporting a problem: the server log's lines name it, "
    "a failure's traceback included.",
    "X-TTS-Batch-Size": "The largest decode-step batch this request shared. Whole files only.",
    "X-TTS-Audio-Seconds": "The audio's length in seconds. Whole files only.",
    "X-TTS-Sample-Rate": "The audio's sample rate in Hz.",
    "X-TTS-Truncated": "`true` when some of the audio was cut at the frame budget rather than ending by itself. "
    "Whole files only.",
    "X-TTS-Seed": "The seed the audio was drawn with: send it as `seed` to get the same audio again.",
    "X-TTS-Ignored-Fields": "Fields of the body that are not in this API and were ignored (a misspelling?). "
    "Absent when there are none.",
    "WWW-Authenticate": "Always `Bearer`.",
}
ROUTE_TAGS = {"/v1/tts/synthesize": "speech", "/livez": "infrastructure", "/readyz": "infrastructure"}
ROUTE_TAGS |= {"/healthz": "infrastructure", "/metrics": "infrastructure"}
UNUSED_IF_UNREFERENCED = ("TaskStatusResponse", "InvalidArgument", "NotFound", "InternalServerError")
UNUSED_IF_UNREFERENCED += ("HTTPValidationError", "ValidationError")
PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script>
      window.onload = () => {{
        window.ui = SwaggerUIBundle({{
          url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true,
          presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
        }});
      }};
    </script>
  </body>
</html>
"""


def version() -> str:
    try:
        return metadata.version("tts-service")
    except metadata.PackageNotFoundError:  # a Bento image installs requirements, not this project
        return "0.1.0"


def _headers(names: Iterable[str]) -> dict[str, Any]:
    return {name: {"description": HEADER_DOCS[name], "schema": {"type": "string"}} for name in names}


def _error(description: str, openai: bool, headers: Iterable[str] = ()) -> dict[str, Any]:
    ref = "#/components/schemas/" + ("OpenAIErrorResponse" if openai else "ErrorResponse")
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}
    if names := list(headers):
        response["headers"] = _headers(names)
    return response


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def document(
    spec: dict[str, Any], body_routes: Iterable[str], api_keys: bool, audio_types: Iterable[str], max_text_chars: int
) -> dict[str, Any]:
    """`spec` as this service really is (see the module's docstring)."""
    spec = copy.deepcopy(spec)
    spec["info"] = {"title": TITLE, "version": version(), "description": DESCRIPTION}
    spec["tags"] = TAGS
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorResponse, OpenAIErrorResponse):
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(generated.pop("$defs", {}))
        schemas[model.__name__] = generated
    body_routes = set(body_routes)
    for path, operations in spec.get("paths", {}).items():
        openai = path.startswith("/v1/audio/") or path == "/v1/models"
        for method, operation in operations.items():
            if path in ROUTE_TAGS:
                operation["tags"] = [ROUTE_TAGS[path]]
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400s here, in the route's error shape
            if method == "post" and path in body_routes:
                responses.pop("404", None)  # BentoML's generic entry; a route that exists never sends it
                body = operation.get("requestBody", {})
                body["required"] = True  # BentoML leaves it optional
                schema = _resolve(spec, body.get("content", {}).get("application/json", {}).get("schema", {}))
                for name in ("text", "input"):
                    if name in schema.get("properties", {}):
                        schema["properties"][name]["maxLength"] = max_text_chars
                success_response = responses.setdefault("200", {})
                success_response["headers"] = _headers(["X-Request-ID", *AUDIO_HEADERS])
                success = success_response.setdefault("content", {})
                for content_type in audio_types:  # every `format` the route can answer with
                    success.setdefault(content_type, {"schema": {"type": "string", "format": "binary"}})
                success.pop("application/json", None)
                responses["400"] = _error("Invalid field; the message names it and the allowed values.", openai)
                responses["413"] = _error("The body is larger than TTS_MAX_BODY_BYTES.", openai)
                responses["415"] = _error("The body is not application/json.", openai)
                responses["429"] = _error("More requests wait than TTS_MAX_QUEUE.", openai, ["Retry-After"])
                responses["500"] = _error("Synthesis failed.", openai, ["X-Request-ID"])
            for status, headers in (("429", ["Retry-After"]), ("500", ["X-Request-ID"])):
                if status in responses:
                    responses[status]["headers"] = _headers(headers)
            if api_keys and path not in OPEN_PATHS:
                responses["401"] = _error("Missing or wrong API key.", openai, ["WWW-Authenticate"])
                operation["security"] = [{"bearerAuth": []}]
    if api_keys:
        schemes = spec["components"].setdefault("securitySchemes", {})
        schemes["bearerAuth"] = {"type": "http", "scheme": "bearer"}
    text = json.dumps(spec["paths"]) + json.dumps({k: v for k, v in schemas.items() if k not in UNUSED_IF_UNREFERENCED})
    for name in UNUSED_IF_UNREFERENCED:  # BentoML's task API and FastAPI's 422 bodies, which no route here sends
        if f'"#/components/schemas/{name}"' not in text:
            schemas.pop(name, None)
    return spec


class OpenAPIDocsMiddleware:
    """Serves the docs page at `/` and rewrites the body of `GET /docs.json` with `document`."""

    def __init__(
        self,
        app: ASGIApp,
        body_routes: Mapping[str, Any] | Iterable[str],
        api_keys: bool,
        audio_types: Iterable[str],
        max_text_chars: int,
    ) -> None:
        self.app = app
        self.options = {
            "body_routes": tuple(body_routes),
            "api_keys": api_keys,
            "audio_types": tuple(audio_types),
            "max_text_chars": max_text_chars,
        }
        self.page = PAGE.format(title=TITLE).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope.get("method") != "GET" or path not in (DOCS_PATH, *PAGE_PATHS):
            await self.app(scope, receive, send)
            return
        if path in PAGE_PATHS:
            headers = [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(self.page)).encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": self.page})
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
                body = json.dumps(document(json.loads(body), **self.options)).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)
