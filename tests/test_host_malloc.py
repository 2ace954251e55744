"""glibc's malloc keeps a CPU engine's freed tensor memory for reuse (``core/host_malloc.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedserve.core import host_malloc

#: A prefill's pattern: tensors of 1-60 MiB allocated, filled and freed in mixed order, 40
#: rounds to warm up, then the minor page faults of 40 more, per page the tensors filled there.
CYCLES = """
import random, resource, sys, torch
from pagedserve.core.host_malloc import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
sizes = random.Random(0).choices([1, 3, 8, 16, 24, 31, 60], k=480)
def rounds(sizes):
    for i in range(0, len(sizes), 6):
        tensors = [torch.empty(mib << 18).fill_(1.0) for mib in sizes[i:i + 6]]
        del tensors
rounds(sizes[:240])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(sizes[240:])
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (sum(sizes[240:]) << 8))
"""

glibc_only = pytest.mark.skipif(not host_malloc.on_glibc(), reason="glibc's malloc")


def _faults_per_page(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@glibc_only
def test_freed_tensors_are_reused_without_faulting_their_pages_in_again() -> None:
    default, tuned = _faults_per_page("default"), _faults_per_page("tuned")
    assert default > 0.1  # glibc maps most such blocks afresh, or trims them away
    assert tuned < 0.1 * default


@pytest.mark.parametrize("name, value, reason", [
    ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2", "GLIBC_TUNABLES"),
    ("MALLOC_ARENA_MAX_", "2", "MALLOC_"),
    ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2", "LD_PRELOAD"),
])
def test_the_users_own_allocator_settings_are_left_alone(monkeypatch, name: str, value: str, reason: str) -> None:
    for variable in ["GLIBC_TUNABLES", "LD_PRELOAD", *(name for name in os.environ if name.startswith("MALLOC_"))]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(name, value)
    assert reason in host_malloc.users_choice()
