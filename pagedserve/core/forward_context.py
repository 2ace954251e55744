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
    #: Per request, its first block when its blocks are consecutive (``b, b + 1, ...``), else
    #: None: a backend on the host can then read its context as one slice of the cache.
    #: None when not known (a captured CUDA graph's layout).
    first_blocks_if_consecutive: list[int | None] | None = None


@dataclass
class ForwardContext:
    backend: AttentionBackend
    attn_metadata: Any
    #: The step's token -> LoRA slot mapping (the LoRA manager's object, read by ``Linear``'s
    #: LoRA slot), or None when no token of the step has an adapter.
    lora_mapping: Any = None


_context: ForwardContext | None = None


@contextlib.contextmanager
def set_forward_context(
    backend: AttentionBackend, attn_metadata: Any, lora_mapping: Any = None
) -> Iterator[None]:
    global _context
    previous = _context
    _context = ForwardContext(backend, attn_metadata, lora_mapping)
    try:
        yield
    finally:
        _context = previous


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("attention ran outside set_forward_context(): call it from a model runner")
    return _context


class TracedDecodeStep:
    """The tensors of a decode step traced into a compiled graph (``core/compiled_decode.py``),
    which an attention backend with ``traced_decode`` attends from inside the graph instead of
    through the opaque op and its host-built metadata.

    Set by the compiled step's wrapper while dynamo traces it (dynamo records the attribute
    writes, so the layers read the graph's own inputs) and None otherwise."""

    backend: AttentionBackend | None = None
    block_tables: torch.Tensor | None = None  # int32 [N, W]: W blocks cover every context
    seq_lens: torch.Tensor | None = None  # int32 [N]
    slot_mapping: torch.Tensor | None = None  # int64 [N]


#: The one traced decode step (its fields are None outside a compiled decode step).
traced_decode_step = TracedDecodeStep()


def get_lora_mapping() -> Any:
    """The step's LoRA mapping; None outside a forward or when the step has no adapter."""
    return None if _context is None else _context.lora_mapping


def build_batch_layout(
    seqs: list[tuple[list[int], int, int]], block_size: int, device: torch.device | str
) -> BatchLayout:
    """Lay out one step's flat batch from ``(block_ids, num_computed_tokens, num_new_tokens)``
    per request, in batch order.

    The index arithmetic runs in numpy on the host (one pass over the block ids, no per-token
    Python loop); the tensors are then moved to ``device`` once each.
    """
    import numpy as np
    import torch

    num_reqs = len(seqs)
    computed = np.fromiter((s[1] for s in seqs), dtype=np.int64, count=num_reqs)
    query_lens = np.fromiter((s[2] for s in seqs), dtype=np.int64, count=num_reqs)
    num_blocks = np.fromiter((len(s[0]) for s in seqs), dtype=np.int64, count=num_reqs)
    seq_lens = computed + query_lens
    short = np.nonzero(num_blocks * block_size < seq_lens)[0]
    if short.size:
        i = int(short[0])
        raise ValueError(
            f"request {i} needs {int(seq_lens[i])} KV slots but its {int(num_blocks[i])} blocks "
            f"of {block_size} hold only {int(num_blocks[i]) * block_size}"
        )

    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    max_blocks = max(int(num_blocks.max(initial=0)), 1)
    block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int64)
    filled = np.arange(max_blocks)[None, :] < num_blocks[:, None]
    block_tables[filled] = np.fromiter(
        (b for s in seqs for b in s[0]), dtype=np.int64, count=int(num_blocks.sum())
    )

    consecutive = np.all((np.diff(block_tables, axis=1) == 1) | ~filled[:, 1:], axis=1)
    first_blocks = [int(b) if c else None for b, c in zip(block_tables[:, 0], consecutive)]

    token_req = np.repeat(np.arange(num_reqs), query_lens)
    positions = np.arange(num_tokens) - query_start_loc[token_req] + computed[token_req]
    slot_mapping = (
        block_tables[token_req, positions // block_size] * block_size + positions % block_size
    )

    from pagedserve.core.sampling import host_to_device

    def to_device(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return host_to_device(array, dtype, device)

    return BatchLayout(
        num_reqs=num_reqs,
        num_tokens=num_tokens,
        query_start_loc=to_device(query_start_loc, torch.int32),
        seq_lens=to_device(seq_lens, torch.int32),
        num_computed_tokens=to_device(computed, torch.int32),
        block_tables=to_device(block_tables, torch.int32),
        slot_mapping=to_device(slot_mapping, torch.int64),
        positions=to_device(positions, torch.int64),
        max_query_len=int(query_lens.max(initial=0)),
        max_seq_len=int(seq_lens.max(initial=0)),
        block_size=block_size,
        query_lens_list=query_lens.tolist(),
        seq_lens_list=seq_lens.tolist(),
        first_blocks_if_consecutive=first_blocks,
    )
