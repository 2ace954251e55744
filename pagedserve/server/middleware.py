"""Middleware of every response: the ``X-Request-Id`` header (the client's, or a new one, also
written into uvicorn's access log line) and CORS, which is off unless ``--allowed-origins`` is
given."""

from __future__ import annotations

import copy
import logging
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-Id"
#: The id of the request being served, for log lines written while it is (uvicorn's access
#: log line is written from inside the app's ``send``, so it sees it too).
current_request_id: ContextVar[str | None] = ContextVar("pagedserve_request_id", default=None)


class RequestIdMiddleware:
    """Every HTTP response carries ``X-Request-Id``: the one the client sent, else a new one.
    Routes read it as ``request.state.request_id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode())
        request_id = sent.decode("latin-1") if sent else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


class AccessLogRequestId(logging.Filter):
    """Gives access log records the ``request_id`` their format names ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, its access lines ending in ``request_id=...``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["access"]["fmt"] += " request_id=%(request_id)s"
    config.setdefault("filters", {})["request_id"] = {"()": AccessLogRequestId}
    config["handlers"]["access"]["filters"] = ["request_id"]
    return config


@dataclass
class CORSOptions:
    """vLLM's ``--allowed-origins``, ``--allowed-methods``, ``--allowed-headers`` and
    ``--allow-credentials``; without origins no CORS header is sent (browsers then refuse
    cross-origin calls)."""

    allowed_origins: list[str] = field(default_factory=list)
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings, got {value!r}")
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError(
                "allow_credentials with allowed_origins '*' would let any site send the user's "
                "credentials; name the origins"
            )


def install_middleware(app: FastAPI, cors: CORSOptions | None) -> None:
    """CORS inside the request-id middleware, so preflight answers carry the id too."""
    if cors is not None and cors.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allowed_origins,
            allow_methods=cors.allowed_methods,
            allow_headers=cors.allowed_headers,
            allow_credentials=cors.allow_credentials,
            expose_headers=[REQUEST_ID_HEADER],
        )
    app.add_middleware(RequestIdMiddleware)
