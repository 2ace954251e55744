"""Tensor parallelism across processes: a real ``pagedserve serve -tp 2`` server (two ranks over
gloo, its worker found through psutil) when a rank dies and when it is told to stop, and two
"machines" on loopback (a headless node in another process)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import httpx2
import psutil
import pytest
from server_process import free_port, start_server

pytestmark = pytest.mark.slow

#: A liveness bound (the test fails instead of hanging), not a timing assertion.
BOUND_SECONDS = 60


def tp_server(model_dir: Path, log: Path):
    command = [sys.executable, "-m", "pagedserve", "serve", str(model_dir), "--tensor-parallel-size", "2"]
    return start_server(command, log, free_port())


def processes_of(server) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children(recursive=True)


def worker_of(server) -> psutil.Process:
    workers = [p for p in processes_of(server) if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in workers]
    return workers[0]


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until_gone(processes: list[psutil.Process]) -> list[psutil.Process]:
    deadline = time.monotonic() + BOUND_SECONDS
    while time.monotonic() < deadline and not all(gone(p) for p in processes):
        time.sleep(0.2)
    return [p for p in processes if not gone(p)]


def test_a_killed_worker_fails_the_server_cleanly(tiny_model, tmp_path: Path) -> None:
    """Mid-stream SIGKILL of rank 1: the stream ends in a 503 error event naming the rank,
    /health answers 503, the server exits non-zero and leaves no process behind."""
    server = tp_server(tiny_model(), tmp_path / "server.log")
    children = processes_of(server)
    worker = worker_of(server)
    events: list[str] = []
    first_token = threading.Event()

    def stream() -> None:
        body = {"model": str(tiny_model()), "prompt": "def f():", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx2.stream("POST", f"{server.url}/v1/completions", json=body, timeout=BOUND_SECONDS) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    first_token.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_token.wait(BOUND_SECONDS)
    worker.send_signal(signal.SIGKILL)
    reader.join(BOUND_SECONDS)
    assert not reader.is_alive(), "the stream did not end after the worker died"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == 503 and "rank 1" in error["message"] and "killed by signal 9" in error["message"]
    assert events[-1] == "data: [DONE]"
    try:
        health = httpx2.get(f"{server.url}/health", timeout=5).status_code
    except httpx2.TransportError:
        health = None  # already gone: the grace period passed on a slow machine
    assert health in (503, None)
    assert server.process.wait(timeout=BOUND_SECONDS) != 0
    assert wait_until_gone(children) == []
    assert "tensor-parallel worker rank 1" in server.log.read_text()


def test_sigterm_stops_every_rank(tiny_model, tmp_path: Path) -> None:
    server = tp_server(tiny_model(), tmp_path / "server.log")
    children = processes_of(server)
    assert worker_of(server) in children
    assert server.stop() == 0
    assert wait_until_gone(children) == []


def test_two_machines_on_loopback(tiny_model) -> None:
    """``--nnodes 2``: node 1 runs ``serve --headless`` (rank 1) in another process, node 0 is this
    process (rank 0); the ranks meet at --master-port, greedy tokens equal one rank's, and the
    headless node exits 0 when rank 0 shuts down."""
    import subprocess

    from pagedserve import LLM, SamplingParams

    model, port = str(tiny_model()), free_port()
    node1 = subprocess.Popen([
        sys.executable, "-m", "pagedserve", "serve", model, "-tp", "2", "--nnodes", "2", "--node-rank", "1",
        "--master-port", str(port), "--dtype", "float32", "--headless",
    ])
    try:
        params = SamplingParams(temperature=0.0, max_tokens=12)
        prompts = ["def f(x):", "import os"]
        llm = LLM(model, dtype="float32", tensor_parallel_size=2, nnodes=2, node_rank=0, master_port=port)
        two = [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
        llm.engine.shutdown()
        assert node1.wait(timeout=BOUND_SECONDS) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
    one = LLM(model, dtype="float32").generate(prompts, params, use_tqdm=False)
    assert two == [out.outputs[0].token_ids for out in one]
