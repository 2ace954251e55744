"""The attention layer model code uses, and the backend interface that plugins implement."""

from __future__ import annotations

import itertools
import weakref
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagedserve.core.forward_context import BatchLayout, TracedDecodeStep, get_forward_context, traced_decode_step
from pagedserve.distributed import parallel_state
from pagedserve.distributed.shards import units_per_rank

if TYPE_CHECKING:
    from pagedserve.core.config import EngineConfig


class AttentionBackend(ABC):
    """Paged attention for one engine: metadata built once a step, ``forward`` once per layer.

    The KV cache of each layer is one tensor whose shape the backend chooses
    (``kv_cache_shape``); the backend both writes the step's new K/V into it (at
    ``slot_mapping``) and attends over it through the block tables. The runner allocates the cache
    zero-filled, so a slot never written holds finite values (masked keys cancel out).
    """

    name: str = ""
    #: Whether a decode step's forward can be captured as a CUDA graph: ``build_metadata`` does
    #: all host work, and ``forward`` reads only tensors of the layout (plus its sizes and
    #: ``max_seq_len``, fixed per captured batch size), so a replay sees the next step's inputs.
    supports_cuda_graphs: bool = False
    #: Whether ``traced_decode`` attends a compiled decode step from inside the graph (else the
    #: step calls the opaque ``pagedserve::attention`` op, which needs ``build_metadata``).
    supports_traced_decode: bool = False

    @classmethod
    def supports(cls, config: EngineConfig) -> str | None:
        """``None`` when this backend can serve ``config``, else the reason it cannot."""
        return None

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        """Default layout: ``[2 (K, V), num_blocks, block_size, num_kv_heads, head_size]``."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: torch.Tensor) -> None:
        """Copy whole blocks ``pairs[:, 0] -> pairs[:, 1]`` in every layer (copy-on-write)."""
        src, dst = pairs[:, 0], pairs[:, 1]
        for kv in kv_caches:
            kv[:, dst] = kv[:, src]

    @abstractmethod
    def build_metadata(self, layout: BatchLayout) -> Any:
        """Turn the step's layout into whatever ``forward`` needs (called once a step)."""

    @abstractmethod
    def forward(
        self,
        layer: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
    ) -> torch.Tensor:
        """Store ``key``/``value`` ([T, Hkv, D]) in ``kv_cache`` and attend ``query`` ([T, H, D]).

        Returns [T, H, D]. Causal within each request's new tokens, over its cached context,
        limited to ``layer.sliding_window`` keys when set (a query at position p sees keys at
        positions p - sliding_window + 1 .. p). With ``layer.logits_soft_cap`` = c the scaled
        scores s become ``c * tanh(s / c)`` before the softmax (Gemma 2).
        """

    def traced_decode(
        self, layer: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        kv_cache: torch.Tensor, step: TracedDecodeStep,
    ) -> torch.Tensor:
        """``forward`` for a decode step (one new token per request) in torch ops dynamo can
        trace, from ``step``'s tensors alone (no host metadata). Only with
        ``supports_traced_decode``."""
        raise NotImplementedError(f"attention backend {self.name!r} has no traced decode")


def heads_of_this_rank(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """The query and key/value heads this tensor-parallel rank attends with: the query heads
    split evenly, the key/value heads too, or (fewer of them than ranks) each replicated on
    ``ranks / num_kv_heads`` ranks, so a rank's KV cache holds only its own heads."""
    world = parallel_state.get_tp_world_size()
    if world == 1:
        return num_heads, num_kv_heads
    if num_heads % world:
        raise ValueError(
            f"{num_heads} attention heads do not divide over tensor_parallel_size={world}; "
            f"use a tensor_parallel_size that divides {num_heads}"
        )
    try:
        return num_heads // world, units_per_rank(num_kv_heads, world)
    except ValueError:
        raise ValueError(
            f"{num_kv_heads} key/value heads neither divide over tensor_parallel_size={world} nor "
            f"divide it (so they could be replicated); use a tensor_parallel_size that "
            f"{num_kv_heads} divides, or that divides {num_kv_heads}"
        ) from None


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache; delegates to the engine's backend.

    ``num_heads`` and ``num_kv_heads`` are the model's; under tensor parallelism the layer keeps
    this rank's share of them (``heads_of_this_rank``).

    The call goes through the custom op ``pagedserve::attention``, so that ``torch.compile``
    treats attention as one opaque step (the backend's metadata is per-step Python state it
    cannot trace) and compiles the rest of the model around it.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        layer_index: int = 0,
        logits_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        num_heads, num_kv_heads = heads_of_this_rank(num_heads, num_kv_heads)
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 (or None for full attention), got {sliding_window}")
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be positive (or None), got {logits_soft_cap}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.layer_index = layer_index
        #: ``c`` of ``c * tanh(scores / c)`` applied to the scaled scores (None: no capping).
        self.logits_soft_cap = logits_soft_cap
        #: Bound by the model runner once the cache is allocated; ``kv_scale`` (float32 [2], the K
        #: and V scales) only for an fp8 cache.
        self.kv_cache: torch.Tensor | None = None
        self.kv_scale: torch.Tensor | None = None
        #: How the custom op finds this layer again: a process-unique number.
        self.op_id = next(_op_ids)
        _layers_by_op_id[self.op_id] = self

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``query`` [T, H*D], ``key``/``value`` [T, Hkv*D] -> [T, H*D]. Eager calls skip the
        custom op: its dispatch imports torch._dynamo on first use (a second of start-up) and
        costs a little every layer, and only a graph being compiled needs attention opaque. A
        compiled decode step whose backend can trace its attention has none."""
        if not torch.compiler.is_compiling():
            return self.attend(query, key, value)
        step = traced_decode_step
        if step.backend is not None:
            return self._by_heads(step.backend.traced_decode, query, key, value, step)
        return torch.ops.pagedserve.attention(query, key, value, self.op_id)

    def _by_heads(self, attend: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  extra: Any) -> torch.Tensor:
        """``attend(self, q, k, v, kv_cache, extra)`` on per-head views, flattened back."""
        out = attend(
            self,
            query.view(-1, self.num_heads, self.head_size),
            key.view(-1, self.num_kv_heads, self.head_size),
            value.view(-1, self.num_kv_heads, self.head_size),
            self.kv_cache,
            extra,
        )
        return out.reshape(-1, self.num_heads * self.head_size)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The eager body of ``forward``: the backend chosen at start-up, with this step's metadata."""
        ctx = get_forward_context()
        if self.kv_cache is None:
            raise RuntimeError("the KV cache is not bound to this attention layer")
        return self._by_heads(ctx.backend.forward, query, key, value, ctx.attn_metadata)


_op_ids = itertools.count()
_layers_by_op_id: weakref.WeakValueDictionary[int, Attention] = weakref.WeakValueDictionary()


# Writes the layer's KV cache, which is not an argument: nothing else in a compiled graph reads
# the cache, and each layer's call depends on the one before through its input.
@torch.library.custom_op("pagedserve::attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, op_id: int) -> torch.Tensor:
    return _layers_by_op_id[op_id].attend(query, key, value)


@_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, op_id: int) -> torch.Tensor:
    return torch.empty_like(query)
