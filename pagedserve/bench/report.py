"""What every benchmark result carries: the machine, the commit, the date; and one printed table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    # Results written by earlier runs of the same script do not make the code dirty.
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def write_result(path: str | Path, kind: str, settings: dict[str, Any], results: dict[str, Any], device: str) -> Path:
    """Write ``results`` as JSON with the machine, commit and date; returns the path."""
    record = {
        "benchmark": kind,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine_info(device),
        "settings": settings,
        "results": results,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def format_table(rows: list[tuple[str, Any]]) -> str:
    """Two aligned columns; floats with three significant decimals."""
    def fmt(value: Any) -> str:
        return f"{value:,.3f}" if isinstance(value, float) else str(value)

    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {fmt(value)}" for name, value in rows)
