"""LoRA adapters as models of the server: ``--lora-modules``, ``model=<adapter>`` selection and,
with ``--enable-lora-runtime-updating``, vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` for folders under ``--lora-root``.

The server keeps the name -> ``LoRARequest`` table; the engine's LoRA manager loads (and checks)
each adapter on the engine thread, so a bad adapter is a 400 and the requests in flight go on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel

from pagedserve.core.lora import LoRARequest
from pagedserve.server.errors import APIError
from pagedserve.server.serving import ServerState, get_state

router = APIRouter()


@dataclass(frozen=True)
class LoRAModulePath:
    """One ``--lora-modules`` entry: ``name=path`` or ``{"name": ..., "path": ...,
    "base_model_name": ...}``."""

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, value: str) -> LoRAModulePath:
        value = value.strip()
        if value.startswith("{"):
            try:
                data = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--lora-modules {value!r} is not valid JSON: {exc}") from exc
            unknown = set(data) - {"name", "path", "base_model_name"}
            if unknown:
                raise ValueError(f"--lora-modules: unknown field(s) {', '.join(sorted(unknown))}")
            if not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
                raise ValueError(f"--lora-modules {value!r} needs string fields 'name' and 'path'")
            return cls(data["name"], data["path"], data.get("base_model_name"))
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {value!r}: give name=path or a JSON object")
        return cls(name, path)


def resolve_adapter_path(path: str) -> str:
    """A bundled adapter's short name (``pagedserve/tiny-py-lora-tests``) -> its folder."""
    from pagedserve.assets import bundled_adapter_path

    bundled = bundled_adapter_path(path)
    return str(bundled) if bundled is not None and not os.path.exists(path) else path


@dataclass
class ServedAdapters:
    """The adapters the server answers to, by model name."""

    base_model_name: str
    roots: list[str] = field(default_factory=list)
    runtime_updating: bool = False
    adapters: dict[str, LoRARequest] = field(default_factory=dict)
    _next_id: int = 1

    def new_request(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        if name == self.base_model_name:
            raise ValueError(f"the adapter name {name!r} is the base model's; choose another")
        if name in self.adapters:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        request = LoRARequest(name, self._next_id, resolve_adapter_path(path), base_model_name)
        self._next_id += 1
        return request

    def check_root(self, path: str) -> None:
        """Runtime loads read only folders under ``--lora-root`` (symlinks resolved)."""
        real = os.path.realpath(path)
        for root in self.roots:
            root_real = os.path.realpath(root)
            if os.path.commonpath([real, root_real]) == root_real:
                return
        raise APIError(400, f"lora_path {path!r} is not under a --lora-root folder", param="lora_path")


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def _served(state: ServerState) -> ServedAdapters:
    adapters = state.adapters
    if adapters is None or not adapters.runtime_updating:
        raise APIError(404, "runtime LoRA updating is off; start the server with --enable-lora-runtime-updating")
    return adapters


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    body: LoadLoRAAdapterRequest, state: Annotated[ServerState, Depends(get_state)]
) -> Response:
    adapters = _served(state)
    if body.load_inplace:
        raise APIError(400, "load_inplace is not supported: unload the adapter, then load it", param="load_inplace")
    adapters.check_root(body.lora_path)
    try:
        lora = adapters.new_request(body.lora_name, body.lora_path)
    except ValueError as exc:
        raise APIError(400, str(exc), param="lora_name") from exc
    try:
        await state.engine.call(lambda engine: engine.lora_manager.add_adapter(lora))
    except ValueError as exc:
        raise APIError(400, str(exc), param="lora_path") from exc
    adapters.adapters[lora.lora_name] = lora
    return Response(f"Success: LoRA adapter '{lora.lora_name}' added successfully.", media_type="text/plain")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(
    body: UnloadLoRAAdapterRequest, state: Annotated[ServerState, Depends(get_state)]
) -> Response:
    adapters = _served(state)
    lora = adapters.adapters.pop(body.lora_name, None)
    if lora is None:
        raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name")
    # Requests already running with it keep it (it is reloaded from its folder if need be).
    await state.engine.call(lambda engine: engine.lora_manager.remove_adapter(lora.lora_int_id))
    return Response(f"Success: LoRA adapter '{lora.lora_name}' removed successfully.", media_type="text/plain")
