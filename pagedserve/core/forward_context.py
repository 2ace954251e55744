"""Per-step attention metadata, made visible to every attention layer with a context manager.

The model runner lays out each step's flat batch once (``BatchLayout``), the attention backend
turns it into its own metadata once (``build_metadata``), and every attention layer reads it from
here during the forward instead of taking it as an argument through model code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pagedserve.core.layers.attention import AttentionBackend


@dataclass
class BatchLayout:
    """One step's flat (varlen) batch: request i owns query tokens
    ``query_start_loc[i]:query_start_loc[i + 1]`` at positions
    ``num_computed_tokens[i] .. seq_lens[i] - 1`` of its sequence."""

    num_reqs: int
    num_tokens: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs], context length after this step
    num_computed_tokens: torch.Tensor  # int32 [num_reqs], context length before this step
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks_per_req], padded with 0
    slot_mapping: torch.Tensor  # int64 [num_tokens], block_id * block_size + offset
    positions: torch.Tensor  # int64 [num_tokens]
    max_query_len: int
    max_seq_len: int
    block_size: int
    # The same sizes as Python lists, for backends that loop on the host.
    query_lens_list: list[int]
    seq_lens_list: list[int]


@dataclass
class ForwardContext:
    backend: AttentionBackend
    attn_metadata: Any


_context: ForwardContext | None = None


@contextlib.contextmanager
def set_forward_context(backend: AttentionBackend, attn_metadata: Any) -> Iterator[None]:
    global _context
    previous = _context
    _context = ForwardContext(backend, attn_metadata)
    try:
        yield
    finally:
        _context = previous


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("attention ran outside set_forward_context(): call it from a model runner")
    return _context
