"""``pagedserve bench startup``: how long the commands take to become useful, measured from
outside, as a user waits for them: ``pagedserve generate`` to its first printed token, and
``pagedserve serve`` to its first ``/health`` 200, each a fresh process."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

#: A command that has not printed (generate) or answered (serve) by then is a failed run.
TIMEOUT_S = 300.0


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pagedserve", *args]


#: The floor under every command here: a bare ``import torch``, timed the same way, so that
#: figures from machines of different speeds can be told apart.
IMPORT_TORCH = [sys.executable, "-c", "import torch; print(flush=True)"]


def time_to_first_output(command: list[str], timeout: float = TIMEOUT_S) -> dict[str, float]:
    """Seconds from spawning ``command`` to its first byte on stdout, and to its exit."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    first: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while first is None and time.perf_counter() - start < timeout:
            if selector.select(timeout=0.01):
                if not os.read(process.stdout.fileno(), 1):
                    break  # closed without output
                first = time.perf_counter() - start
    if first is None:
        process.kill()
        process.wait()
        raise RuntimeError(f"{' '.join(command)} printed nothing (exit code {process.returncode})")
    process.stdout.read()
    code = process.wait(timeout=timeout)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}")
    return {"first_output_s": first, "exit_s": time.perf_counter() - start}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_to_health(args: list[str], timeout: float = TIMEOUT_S) -> dict[str, float]:
    """Seconds from spawning ``pagedserve serve ARGS`` to its first ``/health`` 200 (polled
    every 20 ms), then stopped with SIGTERM."""
    port = _free_port()
    start = time.perf_counter()
    process = subprocess.Popen(_command("serve", *args, "--port", str(port)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"pagedserve serve exited with {process.returncode} before /health answered")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        return {"health_s": time.perf_counter() - start}
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"pagedserve serve did not answer /health within {timeout} s")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_startup(model_args: list[str], num_runs: int, prompt: str) -> dict[str, Any]:
    """``num_runs`` of each measurement (and of ``import torch`` and ``pagedserve --help``, the
    import floors), with the best and the median of each."""
    runs: dict[str, list[float]] = {"import_torch_s": [], "help_s": [], "generate_first_token_s": [],
                                    "generate_exit_s": [], "serve_health_s": []}
    for _ in range(num_runs):
        runs["import_torch_s"].append(time_to_first_output(IMPORT_TORCH)["first_output_s"])
        runs["help_s"].append(time_to_first_output(_command("--help"))["first_output_s"])
        generated = time_to_first_output(_command("generate", *model_args, "--max-tokens", "4", prompt))
        runs["generate_first_token_s"].append(generated["first_output_s"])
        runs["generate_exit_s"].append(generated["exit_s"])
        runs["serve_health_s"].append(time_to_health(model_args)["health_s"])
    results: dict[str, Any] = {}
    for name, values in runs.items():
        results[name] = {"best": min(values), "median": statistics.median(values)}
    results["runs"] = runs
    results["load_average_1m"] = os.getloadavg()[0]
    return results
