"""``GET /dashboard``: a live page of the engine (the KV block map, the requests, the rates),
and ``GET /dashboard/state``, the read-only JSON snapshot it polls.

The page is static HTML, CSS and JavaScript shipped in the package (no CDN, nothing to build).
The snapshot is taken on the engine thread between two steps (``AsyncLLMEngine.call``), so the
engine pays nothing while nobody watches. With ``--api-key`` the snapshot needs the key (the page
asks for it); the page itself holds no data and stays open.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials

from pagedserve.core.engine import LLMEngine
from pagedserve.core.request import Request as EngineRequest
from pagedserve.server.auth import bearer, require_api_key
from pagedserve.server.serving import ServerState, get_state

#: A bigger cache is drawn with each cell standing for several blocks (the busiest state wins).
MAX_CELLS = 8192
#: Requests listed per queue (the counts are always exact).
MAX_LISTED = 64
#: Block states in the map: free, in use, free but holding a cached prefix.
FREE, USED, CACHED = "f", "u", "c"
_STATIC = {
    "": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
#: The page loads only its own files and talks only to this server.
_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'"

router = APIRouter()


def block_map(ref_counts: list[int], block_hashes: list[Any], max_cells: int = MAX_CELLS) -> tuple[str, int]:
    """One character per cell (``f``, ``u``, ``c``) and the blocks a cell stands for."""
    per_cell = -(-len(ref_counts) // max_cells)
    states = [USED if rc else CACHED if h is not None else FREE for rc, h in zip(ref_counts, block_hashes)]
    if per_cell == 1:
        return "".join(states), 1
    cells = []
    for start in range(0, len(states), per_cell):
        chunk = states[start : start + per_cell]
        cells.append(USED if USED in chunk else CACHED if CACHED in chunk else FREE)
    return "".join(cells), per_cell


def _request_row(request: EngineRequest) -> dict[str, Any]:
    return {
        "id": request.parent_id,
        "index": request.index,
        "status": request.status.value,
        "prompt_tokens": request.num_prompt_tokens,
        "computed_tokens": request.num_computed_tokens,
        "output_tokens": request.num_output_tokens,
        "max_tokens": request.max_tokens,
        "blocks": len(request.block_ids),
        "preemptions": request.num_preemptions,
    }


def engine_state(engine: LLMEngine) -> dict[str, Any]:
    """A read-only snapshot of the KV-cache manager and the scheduler (on the engine thread)."""
    kv, scheduler = engine.kv_cache, engine.scheduler
    cells, per_cell = block_map(kv.pool.ref_counts, kv.pool.block_hashes)
    return {
        "kv_cache": {
            "num_blocks": kv.num_blocks,
            "block_size": kv.block_size,
            "used": kv.num_used_blocks,
            "cached_free": kv.num_cached_blocks,
            "free": kv.num_free_blocks - kv.num_cached_blocks,
            "usage": kv.usage,
            "blocks_per_cell": per_cell,
            "cells": cells,
        },
        "num_running": scheduler.num_running,
        "num_waiting": scheduler.num_waiting,
        "running": [_request_row(r) for r in scheduler.running[:MAX_LISTED]],
        "waiting": [_request_row(r) for r in scheduler.waiting[:MAX_LISTED]],
        "num_preemptions": scheduler.num_preemptions_total,
        "prefix_cache_queries": kv.prefix_cache_queries,
        "prefix_cache_hits": kv.prefix_cache_hits,
    }


@dataclass
class _Rate:
    """Generation tokens/s between successive snapshots (over at least ``window`` seconds)."""

    window: float = 1.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    rate: float = 0.0

    def update(self, now: float, total: float) -> float:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.pop(0)
        start, start_total = self.samples[0]
        if now - start >= self.window:
            self.rate = (total - start_total) / (now - start)
        return self.rate


@router.get("/dashboard/state")
async def dashboard_state(
    request: Request,
    state: Annotated[ServerState, Depends(get_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> dict[str, Any]:
    require_api_key(state.api_key, credentials)
    snapshot = await state.engine.call(engine_state)
    tokens = state.registry.get_sample_value(
        "pagedserve:generation_tokens_total", {"model_name": state.model_name}
    ) or 0.0
    rate = getattr(request.app.state, "dashboard_rate", None)
    if rate is None:
        rate = request.app.state.dashboard_rate = _Rate()
    queries, hits = snapshot["prefix_cache_queries"], snapshot["prefix_cache_hits"]
    return {
        **snapshot,
        "model": state.model_name,
        "max_model_len": state.max_model_len,
        "time": time.time(),
        "generation_tokens_total": tokens,
        "generation_tokens_per_s": rate.update(time.monotonic(), tokens),
        "prefix_cache_hit_rate": hits / queries if queries else None,
    }


def _static(path: str) -> Any:
    name, media_type = _STATIC[path]
    body = (resources.files("pagedserve.server") / "static" / name).read_bytes()

    async def serve() -> Response:
        return Response(body, media_type=media_type, headers={"Content-Security-Policy": _CSP})

    return serve


for _suffix in _STATIC:
    router.add_api_route(f"/dashboard{_suffix}", _static(_suffix), methods=["GET"], include_in_schema=False)
