"""glibc's malloc set to keep freed tensor memory for reuse, for an engine that computes on the CPU.

PyTorch's CPU tensors come straight from malloc (there is no caching allocator on the CPU). By
default glibc serves a block above its mmap threshold (128 KiB, raised as blocks are freed, to
at most 32 MiB) with a fresh ``mmap``, and hands freed memory at the heap's top back to the
kernel past its trim threshold: the next tensor of that size is faulted in page by page again.
A prefill step allocates and frees tensors of megabytes for every layer, so it paid those faults
at every op: on a 2-core AMD EPYC, ``x.pow(2)`` of a [2048, 384] float32 tensor took 443 µs
against 40 µs with both thresholds raised, and a 2,048-token prefill of the bundled-scale
Mixtral 151-184 against 123-148 ms (docs/benchmarks.md). Raising both thresholds (what
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...`` does at
start-up, or what the allocators vLLM's CPU guide preloads do their own way) keeps that memory
in the heap: the process holds on to its peak of freed tensors instead of returning it.

Not done where the user set the process's allocator up: ``GLIBC_TUNABLES`` or ``MALLOC_*_`` in the
environment (e.g. ``GLIBC_TUNABLES=glibc.malloc.trim_threshold=131072`` keeps glibc's behaviour),
or another allocator preloaded (``LD_PRELOAD``); nor off glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (a [2048, 14336] float32 intermediate is 117 MiB).
MMAP_THRESHOLD = 256 << 20
#: Free memory at the heap's top returned to the kernel only past this.
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def users_choice() -> str | None:
    """Why the process's allocator is left as it is (None: it may be tuned)."""
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc options"
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return "MALLOC_*_ variables are set"
    if os.environ.get("LD_PRELOAD"):
        return "LD_PRELOAD is set (another allocator, perhaps)"
    if not on_glibc():
        return "the C library is not glibc"
    return None


def on_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once (see the module's
    docstring). Returns whether they are raised."""
    global _applied
    if _applied is None:
        reason = users_choice()
        if reason is not None:
            logger.debug("malloc left as it is: %s", reason)
            _applied = False
        else:
            libc = ctypes.CDLL("libc.so.6")
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
