"""Where start-up time goes: each phase of building an engine is timed, a slow one is logged with
its time as it ends, and the engine logs one summary line when it is ready.

``phase("loading weights")`` may be used by any code the engine constructor runs (the model
runner, a plugin's runner), so a third-party runner's phases land in the same summary.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator

logger = logging.getLogger("pagedserve.startup")

#: A phase taking at least this long is logged at INFO as it ends (others at DEBUG).
SLOW_PHASE_SECONDS = 0.5

_phases: contextvars.ContextVar[list[tuple[str, float]] | None] = contextvars.ContextVar("phases", default=None)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as the start-up phase ``name``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        phases = _phases.get()
        if phases is not None:
            phases.append((name, seconds))
        level = logging.INFO if seconds >= SLOW_PHASE_SECONDS else logging.DEBUG
        logger.log(level, "%s took %.2f s", name, seconds)


@contextlib.contextmanager
def startup(what: str) -> Iterator[list[tuple[str, float]]]:
    """Collect the phases run inside the block and log ``what`` ready, with each phase's time."""
    phases: list[tuple[str, float]] = []
    token = _phases.set(phases)
    start = time.perf_counter()
    try:
        yield phases
    finally:
        _phases.reset(token)
    total = time.perf_counter() - start
    parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases)
    logger.info("%s ready in %.2f s (%s)", what, total, parts or "no phases")
