"""``benchmarks/gpu-check.sh --dry-run``: the GPU check's every step on the CPU with tiny shapes,
so the script cannot rot between GPU runs; its JSON names the device, date, commit and versions
and carries each step's status and figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu-check.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["dry_run"] and report["device"].startswith("cpu") and report["commit"] and report["date"]
    assert set(report["steps"]) == {"cuda-tests", "attention", "quantization", "moe-kernel", "throughput-8b",
                                    "latency-batch-1"}
    assert all(step["status"] == "ok" for step in report["steps"].values()), report["steps"]
    figures = report["figures"]
    assert figures["throughput"]["results"]["speedup_vs_hf_sequential"] > 0
    assert "latency" in figures
    log = (tmp_path / "gpu-check.log").read_text()
    assert "test_cuda.py" in log  # the CUDA tests were collected
