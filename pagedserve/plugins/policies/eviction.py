"""Least-recently-freed eviction of cached blocks."""

from __future__ import annotations

from collections import OrderedDict

from pagedserve.core.policies import EvictionPolicy


class LRUEvictionPolicy(EvictionPolicy):
    """Hands out the block that has been free the longest: a cached prefix survives as long as
    possible after its last user released it."""

    def __init__(self) -> None:
        self._free: OrderedDict[int, None] = OrderedDict()

    def push(self, block_id: int) -> None:
        if block_id in self._free:
            raise ValueError(f"block {block_id} is already free")
        self._free[block_id] = None

    def remove(self, block_id: int) -> None:
        del self._free[block_id]

    def pop(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        return block_id

    def __len__(self) -> int:
        return len(self._free)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._free
