"""An HTTP route ``pagedserve serve`` includes after its own (``/v1`` paths would need the API key)."""

from __future__ import annotations

from fastapi import APIRouter

from pagedserve_example_plugin.processors import OPTION

router = APIRouter()


@router.get("/example/options")
async def options() -> dict[str, str]:
    """What this plugin reads from a request's ``vllm_xargs``."""
    return {OPTION: "token ids never sampled for the request"}
