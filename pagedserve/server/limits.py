"""What one client may ask of the server: ``ServerLimits`` (the flags of docs/server.md's
"Limits and safety"), and the middleware that refuses request bodies over the size limit
with a 413 before they are read in full."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.server.errors import error_response

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """The server's limits on requests and connections, validated at construction."""

    #: Larger bodies get a 413 (a declared ``Content-Length`` at once, a chunked body once it
    #: passes the limit). 8 MiB holds a prompt of a million tokens as ids.
    max_request_body_bytes: int = 8 * MiB
    #: Sequences one HTTP request may ask for (``n`` x prompts, ``best_of`` x prompts); None:
    #: half of ``max_num_seqs``, so one request never holds every seat of a step.
    max_num_seqs_per_request: int | None = None
    #: Accept a ``chat_template`` in requests (vLLM's ``--trust-request-chat-template``): a
    #: template is code the server runs, so by default only the model's (or the server's) runs.
    trust_request_chat_template: bool = False
    #: Seconds an idle keep-alive connection stays open after a response (uvicorn's option).
    timeout_keep_alive: float = 5.0
    #: Seconds a connection has to send a request's headers once it waits for one (after it
    #: opens, or after the previous response); then it is closed.
    timeout_header_read: float = 10.0
    #: Threads that tokenize, render chat templates and detokenize, off the event loop.
    tokenizer_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "tokenizer_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        seqs = self.max_num_seqs_per_request
        if seqs is not None and (not isinstance(seqs, int) or isinstance(seqs, bool) or seqs < 1):
            raise ValueError(f"max_num_seqs_per_request must be a positive integer, got {seqs!r}")
        for name in ("timeout_keep_alive", "timeout_header_read"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 86400:
                raise ValueError(f"{name} must be a number of seconds in (0, 86400), got {value!r}")

    def seqs_per_request(self, max_num_seqs: int) -> int:
        """The per-request sequence cap on an engine of ``max_num_seqs``."""
        if self.max_num_seqs_per_request is None:
            return max(1, max_num_seqs // 2)
        if self.max_num_seqs_per_request > max_num_seqs:
            raise ValueError(
                f"max_num_seqs_per_request ({self.max_num_seqs_per_request}) is more than "
                f"max_num_seqs ({max_num_seqs}); lower it or raise max_num_seqs"
            )
        return self.max_num_seqs_per_request


def _too_large(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes (--max-request-body-bytes)"


class BodySizeLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once when ``Content-Length`` says so, else when
    the bytes read pass it (the route's body parsing then fails with the 413)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(413, _too_large(self.limit))(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, _too_large(self.limit))
            return message

        await self.app(scope, counted_receive, send)
