"""Which part of a checkpoint tensor a rank holds, and reading just that part.

A sharded dimension is made of ``units`` indivisible pieces (attention heads, or single features).
With at least as many units as ranks each rank holds ``units / ranks`` consecutive ones; with
fewer (key/value heads under grouped-query attention), each unit is replicated on
``ranks / units`` consecutive ranks, as vLLM does. Any other combination cannot shard.

``CheckpointSlice`` stands for a tensor still in its safetensors file: narrowing it costs nothing
and ``load`` reads only the selected part (safetensors' ``get_slice``), so no rank reads a whole
tensor it holds only a shard of.
"""

from __future__ import annotations

from typing import Any

import torch


def shard_of(extent: int, units: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, length)`` of ``rank``'s part of a dimension of ``extent`` elements in ``units``."""
    if extent % units:
        raise ValueError(f"{extent} elements do not split into {units} equal units")
    unit = extent // units
    if units % world_size == 0:
        per_rank = units // world_size
        return rank * per_rank * unit, per_rank * unit
    if world_size % units == 0:
        return (rank // (world_size // units)) * unit, unit
    raise ValueError(f"{units} units cannot be shared by {world_size} ranks")


def units_per_rank(units: int, world_size: int) -> int:
    """How many of ``units`` one rank holds (1 when they are replicated); ValueError if neither
    divides the other."""
    if units % world_size == 0:
        return units // world_size
    if world_size % units == 0:
        return 1
    raise ValueError(f"{units} cannot be divided over {world_size} ranks (nor replicated)")


class CheckpointSlice:
    """A safetensors tensor, narrowed lazily; ``load()`` reads the selected part."""

    def __init__(self, source: Any, shape: tuple[int, ...], index: tuple[slice, ...] | None = None) -> None:
        self.source = source
        self.shape = torch.Size(shape)
        self.index = index if index is not None else tuple(slice(0, n) for n in shape)

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ValueError(f"cannot take {start}:{start + length} of dimension {dim} of shape {tuple(self.shape)}")
        base = self.index[dim].start
        index = list(self.index)
        index[dim] = slice(base + start, base + start + length)
        shape = list(self.shape)
        shape[dim] = length
        return CheckpointSlice(self.source, tuple(shape), tuple(index))

    def load(self) -> torch.Tensor:
        if not self.shape:
            return self.source[...]
        return self.source[self.index]


CheckpointTensor = torch.Tensor | CheckpointSlice


def materialize(tensor: CheckpointTensor) -> torch.Tensor:
    return tensor.load() if isinstance(tensor, CheckpointSlice) else tensor
