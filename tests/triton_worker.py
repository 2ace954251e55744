"""Run Triton test cases in a child process: interpreted (``TRITON_INTERPRET=1``) without a GPU,
natively with one.

Why a child: the interpreter must be switched on before any kernel is defined, and an
out-of-bounds load there kills the process. A test sends ``(module, case, kwargs)``; the child
imports ``module`` (a test module, from this folder), calls ``case_<case>(**kwargs)`` and answers
with its JSON result. A crash fails only the test that caused it (with the child's stderr) and
the next call starts a fresh child. Each pytest (or xdist) process keeps one child per test
module, so torch and triton are imported once per module, not once per case.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch


class WorkerCrashed(RuntimeError):
    """The child died while running a case."""


def on_gpu() -> bool:
    return torch.cuda.is_available()


class KernelWorker:
    """A lazily started child process that runs test cases one at a time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: Any = None

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ)
        if not on_gpu():
            env["TRITON_INTERPRET"] = "1"
        self._stderr = tempfile.TemporaryFile(mode="w+")
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def run(self, module: str, case: str, **kwargs: Any) -> Any:
        """``module.case_<case>(**kwargs)`` in the child; its exception re-raised here."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps({"module": module, "case": case, "kwargs": kwargs}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self._proc.wait()
            self._stderr.seek(0)
            tail = self._stderr.read()[-4000:]
            self._proc = None
            raise WorkerCrashed(f"the kernel worker died (exit code {code}) running {case}:\n{tail}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"{case} failed in the kernel worker:\n{reply['error']}")
        return reply["result"]

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        self._proc = None
        if self._stderr is not None:
            self._stderr.close()


def _serve() -> None:
    # The protocol owns the real stdout; anything a case prints goes to stderr.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(1)  # xdist workers already share the cores
    for line in sys.stdin:
        request = json.loads(line)
        try:
            case = getattr(importlib.import_module(request["module"]), "case_" + request["case"])
            reply = {"ok": True, "result": case(**request["kwargs"])}
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            reply = {"ok": False, "error": traceback.format_exc()}
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


if __name__ == "__main__":
    _serve()
