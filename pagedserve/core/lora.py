"""What the core knows of LoRA: the per-request ``LoRARequest`` and the manager interface.

The adapter formats, the slot buffers and the shrink/expand kernels live in a plugin
(``pagedserve.plugins.lora``), which installs a ``LoRAManagerBase`` on the model runner when the
engine starts with ``enable_lora``. The core only routes: a request carries its LoRARequest,
the scheduler limits how many distinct adapters share a step, the runner asks the manager for
the step's token -> slot mapping once and publishes it in the forward context, and every
``Linear`` with a LoRA slot reads it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .request import Request


@dataclass(frozen=True)
class LoRARequest:
    """An adapter a request runs with, as vLLM names it: ``LoRARequest(name, int_id, path)``.

    ``lora_int_id`` (positive) identifies the adapter in the engine: two requests with the same
    id share its slot, and its prefix-cache blocks. ``lora_path`` is the adapter's folder.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id <= 0:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str):
            raise ValueError(f"lora_path must be a string, got {self.lora_path!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def cache_key(self) -> tuple[str, int, str, str]:
        """The prefix-cache extra key: KV computed with one adapter is never reused by another."""
        return ("lora", self.lora_int_id, self.lora_name, self.lora_path)


class LoRAManagerBase(ABC):
    """What the engine and the runner ask of a LoRA manager (installed by a LoRA plugin)."""

    @abstractmethod
    def add_adapter(self, lora_request: LoRARequest) -> None:
        """Make the adapter available (load and validate it now); ValueError, naming what is
        wrong, for an adapter this engine cannot serve. Adding a known adapter again is a no-op;
        the same id with another name or path is a ValueError."""

    @abstractmethod
    def remove_adapter(self, lora_int_id: int) -> bool:
        """Forget the adapter (its CPU copy and its slot); False when it was not loaded."""

    @abstractmethod
    def list_adapters(self) -> list[LoRARequest]:
        """The adapters loaded now (in the CPU cache)."""

    @abstractmethod
    def prepare_step(
        self, lora_requests: Sequence[LoRARequest | None], num_tokens: Sequence[int]
    ) -> Any:
        """Before a step's forward: put each adapter of the step into a slot (at most
        ``max_loras`` distinct ones, the scheduler's promise) and return the token -> slot
        mapping for the forward context, or None when no token of the step has an adapter.
        ``lora_requests[i]`` runs ``num_tokens[i]`` consecutive tokens of the flat batch."""


def adapter_ids(requests: list[Request]) -> dict[int, str]:
    """LoRA adapter id -> name, over the requests that have one."""
    return {r.lora_request.lora_int_id: r.lora_request.lora_name for r in requests if r.lora_request}


class AdapterLimit:
    """One step's admission rule for LoRA adapters: at most ``max_loras`` distinct ones run.

    Once a request is refused because its adapter would be one too many, every later adapter
    request is refused in this step too (even of an adapter in use), so the running adapters
    drain and the refused one is admitted within a bounded wait; base-model requests pass.
    """

    def __init__(self, max_loras: int | None, running: list[Request]) -> None:
        self.max_loras = max_loras
        self.active = set(adapter_ids(running))
        self.blocked = False

    def admits(self, request: Request) -> bool:
        lora = request.lora_request
        if lora is None or self.max_loras is None:
            return True
        if self.blocked:
            return False
        if lora.lora_int_id in self.active:
            return True
        if len(self.active) >= self.max_loras:
            self.blocked = True
            return False
        self.active.add(lora.lora_int_id)
        return True
