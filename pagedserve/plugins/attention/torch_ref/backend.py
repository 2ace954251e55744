"""Paged attention in plain PyTorch: scatter K/V by slot, gather blocks by block table, SDPA.
Slow on a GPU but simple enough to be the reference every kernel is tested against, and the CPU
default.

Where the time goes on a CPU, and what this does about it:

- Single-token (decode) requests are attended in groups, each one padded batch. Gathering the
  padded contexts dominates a decode step, so requests are sorted by context length and a group
  is cut wherever the padding it would save exceeds the cost of one more group
  (``GROUP_COST_SLOTS``), instead of padding every request to the longest.
- Blocks are gathered with ``index_select`` on the block axis (a row copy per block), several
  times faster on the CPU than advanced indexing, which addresses every element.
- A request with several new tokens and nothing cached (a first prefill chunk) attends to its new
  K/V directly, without reading them back from the cache, and without a mask when it has no
  sliding window (SDPA's own causal path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pagedserve.core.forward_context import BatchLayout
from pagedserve.core.layers.attention import Attention, AttentionBackend

if TYPE_CHECKING:
    from pagedserve.core.config import EngineConfig

#: A decode group costs about as much as gathering and attending this many padded key slots
#: (measured on a CPU: one group's gathers and SDPA call are ~50 µs, a padded slot ~40 ns).
GROUP_COST_SLOTS = 1024


@dataclass
class DecodeGroup:
    """Single-token requests attended together, their contexts padded to ``num_blocks`` blocks."""

    tokens: torch.Tensor  # int64 [N]: the query token of each request
    block_ids: torch.Tensor  # int64 [N * num_blocks]: their block tables, row by row
    num_blocks: int
    query_positions: torch.Tensor  # int64 [N, 1]
    #: By sliding window (None = full): [N, 1, 1, num_blocks * block_size], True where attended.
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, sliding_window: int | None, block_size: int) -> torch.Tensor:
        mask = self.masks.get(sliding_window)
        if mask is None:
            keys = torch.arange(self.num_blocks * block_size, device=self.tokens.device)[None, :]
            mask = keys <= self.query_positions
            if sliding_window is not None:
                mask &= keys > self.query_positions - sliding_window
            mask = self.masks[sliding_window] = mask[:, None, None, :]
        return mask


@dataclass
class MultiTokenSpan:
    """A request with several new tokens (prefill, a prefill chunk, speculative verification):
    query tokens ``start:end``, the last ``end - start`` of its ``seq_len`` positions."""

    start: int
    end: int
    seq_len: int
    #: Its blocks (int64), or None when nothing was cached before this step: then its keys and
    #: values are exactly this step's new ones.
    block_ids: torch.Tensor | None


@dataclass
class TorchRefMetadata:
    layout: BatchLayout
    decode_groups: list[DecodeGroup]
    spans: list[MultiTokenSpan]


def group_by_length(lengths: list[int], cost: int) -> list[list[int]]:
    """Split indices into groups padded to their longest member: sorted by length, longest first,
    a new group starts where the padding it saves the rest (each shorter by at least the gap)
    exceeds ``cost``."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    groups: list[list[int]] = []
    longest = 0
    for rank, i in enumerate(order):
        remaining = len(order) - rank
        if not groups or (longest - lengths[i]) * remaining > cost:
            groups.append([])
            longest = lengths[i]
        groups[-1].append(i)
    return groups


class TorchRefBackend(AttentionBackend):
    """The reference paged attention backend (CPU default)."""

    name = "torch_ref"

    @classmethod
    def supports(cls, config: EngineConfig | None) -> str | None:
        if config is not None and config.cache.kv_cache_dtype != "auto":
            return (
                f"kv_cache_dtype={config.cache.kv_cache_dtype!r} is not implemented by the reference "
                "backend; use attention_backend='triton' (on a GPU)"
            )
        return None

    def build_metadata(self, layout: BatchLayout) -> TorchRefMetadata:
        device = layout.block_tables.device
        block_size = layout.block_size
        tables = layout.block_tables.long()
        decodes: list[int] = []
        spans: list[MultiTokenSpan] = []
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(layout.query_lens_list, layout.seq_lens_list)):
            if query_len == 1:
                decodes.append(i)
            elif query_len > 1:
                cached = seq_len > query_len
                blocks = tables[i, : -(-seq_len // block_size)] if cached else None
                spans.append(MultiTokenSpan(start, start + query_len, seq_len, blocks))
            start += query_len

        groups = []
        num_blocks = [-(-layout.seq_lens_list[i] // block_size) for i in decodes]
        for members in group_by_length(num_blocks, GROUP_COST_SLOTS // block_size):
            reqs = torch.tensor([decodes[m] for m in members], dtype=torch.long, device=device)
            width = num_blocks[members[0]]
            groups.append(
                DecodeGroup(
                    tokens=layout.query_start_loc[reqs].long(),
                    block_ids=tables[reqs, :width].flatten(),
                    num_blocks=width,
                    query_positions=(layout.seq_lens[reqs].long() - 1)[:, None],
                )
            )
        return TorchRefMetadata(layout=layout, decode_groups=groups, spans=spans)

    def forward(
        self,
        layer: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchRefMetadata,
    ) -> torch.Tensor:
        layout = metadata.layout
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        slots = (-1, layer.num_kv_heads, layer.head_size)
        key_cache.view(slots).index_copy_(0, layout.slot_mapping, key.to(key_cache.dtype))
        value_cache.view(slots).index_copy_(0, layout.slot_mapping, value.to(value_cache.dtype))

        out = torch.empty_like(query)
        for group in metadata.decode_groups:
            out.index_copy_(0, group.tokens, self._decode(layer, query, key_cache, value_cache, group, layout))
        for span in metadata.spans:
            out[span.start : span.end] = self._multi_token(layer, query, key, value, key_cache, value_cache, span)
        return out

    def _decode(
        self,
        layer: Attention,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        group: DecodeGroup,
        layout: BatchLayout,
    ) -> torch.Tensor:
        """One group of single-token requests at once, their contexts padded to the longest."""
        # Padding past a request's context is masked out; the runner zero-fills the cache, so
        # slots never written hold finite values that the mask cancels.
        shape = (group.tokens.numel(), group.num_blocks * layout.block_size, layer.num_kv_heads, layer.head_size)
        keys = key_cache.index_select(0, group.block_ids).view(shape)  # [N, L, Hkv, D]
        values = value_cache.index_select(0, group.block_ids).view(shape)
        queries = query.index_select(0, group.tokens).unsqueeze(2)  # [N, H, 1, D]
        mask = group.mask(layer.sliding_window, layout.block_size)
        out = _attend(layer, queries, keys.transpose(1, 2), values.transpose(1, 2), mask)
        return out.squeeze(2)

    def _multi_token(
        self,
        layer: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        span: MultiTokenSpan,
    ) -> torch.Tensor:
        """One request's new tokens against its whole context (causal at absolute positions)."""
        seq_len, query_len = span.seq_len, span.end - span.start
        if span.block_ids is None:
            keys, values = key[span.start : span.end], value[span.start : span.end]
        else:
            keys = key_cache.index_select(0, span.block_ids).flatten(0, 1)[:seq_len]  # [S, Hkv, D]
            values = value_cache.index_select(0, span.block_ids).flatten(0, 1)[:seq_len]
        mask = None
        if span.block_ids is not None or layer.sliding_window is not None:
            key_positions = torch.arange(seq_len, device=query.device)[None, :]
            query_positions = key_positions[:, seq_len - query_len :].T
            mask = key_positions <= query_positions
            if layer.sliding_window is not None:
                mask &= key_positions > query_positions - layer.sliding_window
        out = _attend(
            layer,
            query[span.start : span.end].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            mask,
        )
        return out.squeeze(0).transpose(0, 1)


def _attend(
    layer: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """SDPA over [N, H, Lq, D] queries and [N, Hkv, Lk, D] keys/values (SDPA's own GQA/MQA
    grouping, no copies of the KV heads); no mask means causal over equal query and key lengths.
    Half-precision inputs go in as they are: SDPA accumulates them in fp32 itself (upcasting
    first gave the same results, and was three times slower in bf16 on the CPU).

    SDPA cannot cap scores, so a layer with ``logits_soft_cap`` takes ``_soft_capped``."""
    if layer.logits_soft_cap is not None:
        return _soft_capped(layer, query, key, value, mask)
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=mask is None,
        scale=layer.scale,
        enable_gqa=layer.num_heads != layer.num_kv_heads,
    )


def _soft_capped(
    layer: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """``_attend`` with the scaled scores capped to ``c * tanh(s / c)``, in float32. The query
    heads sharing a KV head are folded into the query axis, so the KV heads are not copied."""
    n, num_heads, query_len, head_size = query.shape
    num_kv_heads, key_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    q = query.float().reshape(n, num_kv_heads, group * query_len, head_size)
    scores = (q @ key.float().transpose(-1, -2)) * layer.scale
    cap = layer.logits_soft_cap
    scores = (torch.tanh(scores / cap) * cap).view(n, num_kv_heads, group, query_len, key_len)
    if mask is None:
        mask = torch.ones(query_len, key_len, dtype=torch.bool, device=query.device).tril()
    elif mask.dim() == 4:  # [N, 1, Lq, Lk] -> [N, 1, 1, Lq, Lk]
        mask = mask.unsqueeze(2)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = probs.view(n, num_kv_heads, group * query_len, key_len) @ value.float()
    return out.view(n, num_heads, query_len, head_size).to(query.dtype)
