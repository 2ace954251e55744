"""The AWQ/GPTQ and FP8 Triton kernels against the torch path (``quant_triton_check.py``), in a
subprocess: under ``TRITON_INTERPRET=1`` on the CPU, natively on a GPU when there is one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

CHECK = Path(__file__).with_name("quant_triton_check.py")


def run_check(device: str, interpret: bool) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    command = [sys.executable, str(CHECK), device]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout and done.stdout.count("ok ") >= 30


def test_kernels_under_the_interpreter() -> None:
    run_check("cpu", interpret=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_the_gpu() -> None:
    run_check("cuda", interpret=False)
