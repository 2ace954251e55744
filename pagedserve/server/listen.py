"""The server's listening socket, bound before anything slow happens (imports, the model load), so
that a port in use is reported at once."""

from __future__ import annotations

import socket


class ServerStartError(RuntimeError):
    """The server cannot start (its address cannot be bound); the message says what to change."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it once the model is loaded)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no obstacle
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerStartError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what holds the port or "
            "choose another with --port"
        ) from exc
    return sock
