"""The interfaces behind three plugin registries: scheduling policies, eviction policies and
prefix hash functions. The built-in implementations live in ``pagedserve.plugins.policies``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedserve.core.request import Request

#: ``(parent block hash or None for the first block, the block's token ids, extra keys) -> hash``.
#: Extra keys are ``None``, a ``str``, an ``int`` or (nested) tuples of those.
PrefixHashFn = Callable[[bytes | None, tuple[int, ...], Any], bytes]


class SchedulingPolicy(ABC):
    """Decides the order of the waiting queue and whom to preempt when KV blocks run out."""

    @abstractmethod
    def sort_key(self, request: Request) -> tuple:
        """The waiting queue is served in ascending order of this key."""

    @abstractmethod
    def pick_victim(self, running: list[Request]) -> Request:
        """The request to preempt among ``running`` (never empty), which is ordered by when
        each request was (re)admitted, the most recently admitted last."""


class EvictionPolicy(ABC):
    """Holds the free blocks (reference count 0) in the order they are handed out again.

    A free block may still hold a cached prefix; handing it out evicts that prefix, so the order
    is the eviction order.
    """

    @abstractmethod
    def push(self, block_id: int) -> None:
        """``block_id`` became free."""

    @abstractmethod
    def remove(self, block_id: int) -> None:
        """A free block is taken back by a prefix-cache hit (it must be present)."""

    @abstractmethod
    def pop(self) -> int:
        """Remove and return the next block to hand out (the pool checks it is not empty)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, block_id: object) -> bool: ...
