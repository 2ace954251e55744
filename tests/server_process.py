"""Start and stop a real ``pagedserve serve`` process for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

#: The engine flags of the test servers (and of the offline LLM they are compared with).
ENGINE_ARGS = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 64}
MAX_MODEL_LEN = ENGINE_ARGS["max_model_len"]
API_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (connections of the old one may linger in
    TIME_WAIT, which SO_REUSEADDR allows, as uvicorn sets it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx2.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the server did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def start_server(
    command: list[str], log: Path, port: int, *extra: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> Server:
    """Run ``command`` with ENGINE_ARGS (and ``extra`` flags, and ``env`` added to the
    environment) on ``port``; return once ``/health`` answers 200."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in ENGINE_ARGS.items()]
    process = subprocess.Popen(
        [*command, *flags, *extra, "--port", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    server = Server(process, port, log)
    try:
        server.wait_ready(timeout)
    except BaseException:  # a server that did not come up is not left running
        process.kill()
        process.wait()
        raise
    return server


def metric(server: Server, sample: str, **labels: str) -> float:
    """One sample of the server's ``/metrics``."""
    return parse_metric(httpx2.get(f"{server.url}/metrics").text, sample, **labels)


def parse_metric(text: str, sample: str, **labels: str) -> float:
    """One sample of a Prometheus exposition, read with prometheus_client's own parser."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    raise KeyError(sample)


_SHARED = pytest.StashKey["Server"]()


def shared_server(config: pytest.Config, model_dir: Path, log_dir: Path) -> Server:
    """The ``pagedserve serve MODEL --api-key API_KEY`` of this test process, started by the
    first module that asks and stopped when the session ends (one per xdist worker)."""
    if _SHARED not in config.stash:
        command = [sys.executable, "-m", "pagedserve", "serve", str(model_dir)]
        server = start_server(command, log_dir / "server.log", free_port(), "--api-key", API_KEY)
        config.stash[_SHARED] = server
        config.add_cleanup(server.stop)
    return config.stash[_SHARED]
