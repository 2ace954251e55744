"""uvicorn's h11 HTTP/1.1 protocol with a header-read timeout.

uvicorn closes a keep-alive connection left idle after a response (``timeout_keep_alive``), but
has no limit on how long a client may take to send a request's headers: a connection that
opens and sends nothing, or half a request line, is kept forever (and data arriving cancels
the keep-alive timer). This protocol arms one timer whenever the connection waits for a new
request (when it opens, and after each response) and disarms it once h11 has read the request's
headers; when it fires first the connection is closed. Nothing else of uvicorn's protocol
changes, and the server always uses h11 (not httptools), whichever is installed.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers take more than
    ``timeout_header_read`` seconds (a class attribute: uvicorn builds the protocol itself)."""

    timeout_header_read: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # a pipelined request already read needs no timer

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the request failed)
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.timeout_header_read, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class to give uvicorn as ``http=``, with its header-read timeout."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"timeout_header_read": seconds})
