"""The OpenAPI document as the server's contract: every error status the server sends, each
with OpenAI's error body, and not FastAPI's 422 (validation errors are answered 400)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pagedserve.server.protocol import ErrorResponse

#: The errors any route may answer (docs/server.md, "Errors"), for ``FastAPI(responses=...)``.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The request is invalid (types, values, limits)"},
    401: {"model": ErrorResponse, "description": "The API key is missing or wrong (/v1 routes, with --api-key)"},
    404: {"model": ErrorResponse, "description": "An unknown model or route"},
    413: {"model": ErrorResponse, "description": "The request body is over --max-request-body-bytes"},
    503: {"model": ErrorResponse, "description": "The engine is not running"},
}


def json_or_event_stream(model: type) -> dict[int | str, dict[str, Any]]:
    """A 200 that is ``model`` as JSON, or Server-Sent Events when the request streams."""
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def needs_api_key(path: str, api_key_set: bool) -> bool:
    """Whether a route answers 401 without the key: the ``/v1`` routes, with ``--api-key``."""
    return api_key_set and path.startswith("/v1")


def install_openapi(app: FastAPI, api_key_set: bool) -> None:
    """Serve the document without the 422 FastAPI adds to routes that validate a body, with
    every error as JSON (FastAPI gives a text route's errors its text media type), and with
    the bearer key and its 401 on the routes that need it only."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, description=app.description
            )
            error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    for status in ERROR_RESPONSES:  # JSON, whatever the route's own responses are
                        responses[str(status)]["content"] = error_body
                    if not needs_api_key(path, api_key_set):
                        operation.pop("security", None)
                        responses.pop("401")
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
