"""Connection hygiene of a real server: connections that never finish their request headers
(or never send any) are closed after ``--timeout-header-read``, idle keep-alive connections
after ``--timeout-keep-alive``, and ``/health`` answers all the while."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator

import httpx2
import pytest
from server_process import Server, free_port, start_server

pytestmark = pytest.mark.slow

#: What a client that stalls sends: nothing, part of a request line, most of the headers.
HALF_SENT = [b"", b"POST /v1/comple", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app"]
#: Longer than both timeouts, short enough for a test: how long a socket may stay open.
GUARD_SECONDS = 30


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("connections") / "server.log"
    command = [sys.executable, "-m", "pagedserve", "serve", str(tiny_model())]
    server = start_server(command, log, free_port(), "--timeout-header-read", "2", "--timeout-keep-alive", "1")
    yield server
    assert server.stop() == 0


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (True) or GUARD_SECONDS pass without it (False)."""
    sock.settimeout(GUARD_SECONDS)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_200_half_sent_connections_are_closed_while_health_answers(server: Server) -> None:
    sockets = []
    try:
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(HALF_SENT[i % len(HALF_SENT)])
            sockets.append(sock)
        for _ in range(3):
            assert httpx2.get(f"{server.url}/health", timeout=GUARD_SECONDS).status_code == 200
        still_open = [i for i, sock in enumerate(sockets) if not closed_by_server(sock)]
        assert still_open == []
    finally:
        for sock in sockets:
            sock.close()
    assert httpx2.get(f"{server.url}/health").status_code == 200


def test_a_keep_alive_connection_is_closed_when_idle_or_half_sent(server: Server) -> None:
    request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
    for after_response in (b"", b"GET /hea"):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request)
            sock.settimeout(GUARD_SECONDS)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.sendall(after_response)
            assert closed_by_server(sock)


def test_the_limits_are_flags() -> None:
    from click.testing import CliRunner

    from pagedserve.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--help"])
    for flag in ("--timeout-header-read", "--timeout-keep-alive", "--max-request-body-bytes",
                 "--max-num-seqs-per-request", "--trust-request-chat-template"):
        assert flag in result.output
