"""Paged attention in plain PyTorch: scatter K/V by slot, gather blocks by block table, SDPA.
Slow on a GPU but simple enough to be the reference every kernel is tested against, and the CPU
default.

Where the time goes on a CPU, and what this does about it:

- Single-token (decode) requests are attended in groups, each one padded batch. Gathering the
  padded contexts dominates a decode step, so requests are sorted by context length and a group
  is cut wherever the padding it would save exceeds the cost of one more group
  (``GROUP_COST_SLOTS``), instead of padding every request to the longest.
- Blocks are gathered with ``index_select`` on the block axis (a row copy per block), several
  times faster on the CPU than advanced indexing, which addresses every element, into one buffer
  per step that every layer reuses (``TorchRefMetadata.gather``).
- A decode group's query heads are grouped by the KV head they share and attended as that head's
  rows under one additive mask made once a step; a decode-only step in one group is attended
  without reordering its queries or its output.
- A request with several new tokens and nothing cached (a first prefill chunk) attends to its new
  K/V directly, without reading them back from the cache, and without a mask when it has no
  sliding window (SDPA's own causal path). With a cached context in consecutive blocks on the CPU
  (a speculative verification, a draft's catch-up) it attends a slice of the cache, its query
  heads grouped by KV head under one mask made once a step.
- A compiled decode step (``-O3`` on the CPU) attends inside its graph (``traced_decode``): no
  host metadata, no gather, no opaque op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pagedserve.core.forward_context import BatchLayout, TracedDecodeStep
from pagedserve.core.layers.attention import Attention, AttentionBackend

if TYPE_CHECKING:
    from pagedserve.core.config import EngineConfig

#: A decode group costs about as much as gathering and attending this many padded key slots
#: (measured on a CPU: one group's gathers and SDPA call are ~50 µs, a padded slot ~40 ns).
GROUP_COST_SLOTS = 1024
#: The most new tokens of a request whose query heads are folded into their KV head's query
#: rows (a speculative verification, a draft's catch-up); a long prefill chunk's folded mask
#: would be that many times larger than its own.
MAX_FOLDED_QUERY_LEN = 32


@dataclass
class DecodeGroup:
    """Single-token requests attended together, their contexts padded to ``num_blocks`` blocks."""

    tokens: torch.Tensor  # int64 [N]: the query token of each request
    block_ids: torch.Tensor  # int64 [N * num_blocks]: their block tables, row by row
    num_blocks: int
    query_positions: torch.Tensor  # int64 [N, 1]
    #: Its tokens are the whole step's, in order (a decode-only step attended in one group):
    #: the queries and the output need no reordering.
    whole_step: bool = False
    #: A single request on the CPU whose blocks are consecutive: (its first block, its context
    #: length). Its keys and values are then a slice of the cache, attended without a gather
    #: or a mask (the slice ends at its last token).
    contiguous: tuple[int, int] | None = None
    #: By (sliding window (None = full), dtype): [N, 1, 1, num_blocks * block_size].
    masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def mask(self, sliding_window: int | None, block_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive (0 where attended, -inf elsewhere, in the queries' dtype): what SDPA would turn
        a boolean mask into at every call, made once a step."""
        key = (sliding_window, dtype)
        mask = self.masks.get(key)
        if mask is None:
            keys = torch.arange(self.num_blocks * block_size, device=self.tokens.device)[None, :]
            attended = keys <= self.query_positions
            if sliding_window is not None:
                attended &= keys > self.query_positions - sliding_window
            mask = torch.zeros(attended.shape, dtype=dtype, device=attended.device)
            mask = self.masks[key] = mask.masked_fill_(~attended, float("-inf"))[:, None, None, :]
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
    #: On the CPU, when something was cached and its blocks are consecutive: the first one (its
    #: keys and values are then a slice of the cache, no gather).
    first_block: int | None = None
    #: By (sliding window, dtype): the additive mask of its queries at their absolute positions,
    #: [H / Hkv * query_len, seq_len] (the query heads sharing a KV head fold into its query
    #: rows), made once a step for every layer.
    masks: dict[tuple[int | None, torch.dtype, int], torch.Tensor] = field(default_factory=dict)

    def mask(self, sliding_window: int | None, dtype: torch.dtype, group: int, device: torch.device) -> torch.Tensor:
        key = (sliding_window, dtype, group)
        mask = self.masks.get(key)
        if mask is None:
            query_len = self.end - self.start
            key_positions = torch.arange(self.seq_len, device=device)[None, :]
            query_positions = key_positions[:, self.seq_len - query_len :].T
            attended = key_positions <= query_positions
            if sliding_window is not None:
                attended &= key_positions > query_positions - sliding_window
            mask = torch.zeros(attended.shape, dtype=dtype, device=device).masked_fill_(~attended, float("-inf"))
            mask = self.masks[key] = mask.repeat(group, 1)
        return mask


@dataclass
class TorchRefMetadata:
    layout: BatchLayout
    decode_groups: list[DecodeGroup]
    spans: list[MultiTokenSpan]
    #: Where the decode groups' contexts are gathered: one buffer for the step, reused by every
    #: group of every layer (each gather is dead once its SDPA returned). A fresh tensor per
    #: gather spent about half of it in page faults on a CPU.
    scratch: torch.Tensor | None = None

    def gather(self, cache: torch.Tensor, block_ids: torch.Tensor, part: int) -> torch.Tensor:
        """``cache.index_select(0, block_ids)`` into part ``part`` (0: keys, 1: values) of the
        scratch buffer."""
        shape = (block_ids.numel(), *cache.shape[1:])
        numel = shape[0] * cache[0].numel()
        if self.scratch is None or self.scratch.shape[1] < numel or self.scratch.dtype != cache.dtype:
            self.scratch = torch.empty(2, numel, dtype=cache.dtype, device=cache.device)
        return torch.index_select(cache, 0, block_ids, out=self.scratch[part, :numel].view(shape))


def _contiguous(decodes: list[int], members: list[int], layout: BatchLayout) -> tuple[int, int] | None:
    """``DecodeGroup.contiguous`` for a group of one request on the CPU."""
    firsts = layout.first_blocks_if_consecutive
    if len(members) != 1 or firsts is None or layout.block_tables.device.type != "cpu":
        return None
    req = decodes[members[0]]
    first = firsts[req]
    return None if first is None else (first, layout.seq_lens_list[req])


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
    supports_traced_decode = True

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
        firsts = layout.first_blocks_if_consecutive if device.type == "cpu" else None
        decodes: list[int] = []
        spans: list[MultiTokenSpan] = []
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(layout.query_lens_list, layout.seq_lens_list)):
            if query_len == 1:
                decodes.append(i)
            elif query_len > 1:
                cached = seq_len > query_len
                first = firsts[i] if cached and firsts is not None else None
                blocks = tables[i, : -(-seq_len // block_size)] if cached and first is None else None
                spans.append(MultiTokenSpan(start, start + query_len, seq_len, blocks, first))
            start += query_len

        groups = []
        num_blocks = [-(-layout.seq_lens_list[i] // block_size) for i in decodes]
        for members in group_by_length(num_blocks, GROUP_COST_SLOTS // block_size):
            members.sort()  # batch order within the group: one group of a decode step needs no reordering
            reqs = torch.tensor([decodes[m] for m in members], dtype=torch.long, device=device)
            width = max(num_blocks[m] for m in members)
            groups.append(
                DecodeGroup(
                    tokens=layout.query_start_loc[reqs].long(),
                    block_ids=tables[reqs, :width].flatten(),
                    num_blocks=width,
                    query_positions=(layout.seq_lens[reqs].long() - 1)[:, None],
                    whole_step=len(members) == layout.num_tokens,
                    contiguous=_contiguous(decodes, members, layout),
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

        groups = metadata.decode_groups
        if len(groups) == 1 and groups[0].whole_step:
            return self._decode(layer, query, key_cache, value_cache, groups[0], metadata)
        out = torch.empty_like(query)
        for group in groups:
            out.index_copy_(0, group.tokens, self._decode(layer, query, key_cache, value_cache, group, metadata))
        for span in metadata.spans:
            out[span.start : span.end] = self._multi_token(layer, query, key, value, key_cache, value_cache, span)
        return out

    def traced_decode(
        self,
        layer: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        step: TracedDecodeStep,
    ) -> torch.Tensor:
        """Each request's one query against its blocks, read through the block table where they
        lie: inductor fuses the indexing into the score and output reductions, so no copy of the
        contexts is made (the eager path's gather), and the step needs no host-built metadata.
        Scores past a context, or outside the sliding window, are masked; float32 throughout."""
        assert step.block_tables is not None and step.seq_lens is not None and step.slot_mapping is not None
        n, num_kv_heads, head_size = key.shape
        block_size = kv_cache.shape[2]
        # One write into the cache tensor itself (K and V by a leading index), which inductor
        # does in place; through a view of it, functionalization copied the whole cache.
        parts = torch.arange(2, device=key.device)[:, None]
        slots = step.slot_mapping[None, :]
        kv_cache.index_put_((parts, slots // block_size, slots % block_size),
                            torch.stack((key, value)).to(kv_cache.dtype))
        width = step.block_tables.shape[1] * block_size
        kv_shape = (n, width, num_kv_heads, 1, head_size)
        keys = kv_cache[0][step.block_tables].view(kv_shape)
        values = kv_cache[1][step.block_tables].view(kv_shape)
        queries = query.view(n, 1, num_kv_heads, -1, head_size).float()  # the heads sharing a KV head
        scores = (queries * keys).sum(-1) * layer.scale  # [N, L, Hkv, H / Hkv]
        if layer.logits_soft_cap is not None:
            scores = torch.tanh(scores / layer.logits_soft_cap) * layer.logits_soft_cap
        key_positions = torch.arange(width, device=query.device)[None, :]
        last = (step.seq_lens.long() - 1)[:, None]
        attended = key_positions <= last
        if layer.sliding_window is not None:
            attended &= key_positions > last - layer.sliding_window
        probs = scores.masked_fill(~attended[:, :, None, None], float("-inf")).softmax(1)
        out = (probs[..., None] * values).sum(1)  # [N, Hkv, H / Hkv, D]
        return out.view(n, layer.num_heads, head_size).to(query.dtype)

    def _decode(
        self,
        layer: Attention,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        group: DecodeGroup,
        metadata: TorchRefMetadata,
    ) -> torch.Tensor:
        """One group of single-token requests at once, their contexts padded to the longest."""
        # Padding past a request's context is masked out; the runner zero-fills the cache, so
        # slots never written hold finite values that the mask cancels.
        block_size = metadata.layout.block_size
        queries = query if group.whole_step else query.index_select(0, group.tokens)  # [N, H, D]
        if group.contiguous is not None and layer.logits_soft_cap is None:
            first, seq_len = group.contiguous
            if layer.sliding_window is None or seq_len <= layer.sliding_window:
                end = first + -(-seq_len // block_size)
                kv_shape = (-1, layer.num_kv_heads, layer.head_size)
                keys = key_cache[first:end].view(kv_shape)[:seq_len].transpose(0, 1)[None]  # [1, Hkv, L, D]
                values = value_cache[first:end].view(kv_shape)[:seq_len].transpose(0, 1)[None]
                grouped = queries.view(1, layer.num_kv_heads, -1, layer.head_size)
                out = F.scaled_dot_product_attention(grouped, keys, values, scale=layer.scale)
                return out.reshape(1, layer.num_heads, layer.head_size)
        shape = (group.tokens.numel(), group.num_blocks * block_size, layer.num_kv_heads, layer.head_size)
        keys = metadata.gather(key_cache, group.block_ids, 0).view(shape)  # [N, L, Hkv, D]
        values = metadata.gather(value_cache, group.block_ids, 1).view(shape)
        mask = group.mask(layer.sliding_window, block_size, query.dtype)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [N, Hkv, L, D]
        if layer.logits_soft_cap is not None:
            return _soft_capped(layer, queries.unsqueeze(2), keys, values, mask).squeeze(2)
        # The query heads that share a KV head are that head's queries: [N, Hkv, H / Hkv, D] under
        # one mask, which SDPA attends 1.3-1.7x faster on a CPU than its own GQA (each KV head
        # read once, in one block of query rows; measured at batch 1-64, contexts 160-512).
        n = queries.shape[0]
        grouped = queries.view(n, layer.num_kv_heads, -1, layer.head_size)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=layer.scale)
        return out.reshape(n, layer.num_heads, layer.head_size)

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
        if span.first_block is not None:
            if layer.logits_soft_cap is None and query_len <= MAX_FOLDED_QUERY_LEN:
                return self._multi_token_slice(layer, query, key_cache, value_cache, span)
            end = span.first_block + -(-seq_len // key_cache.shape[1])
            keys = key_cache[span.first_block : end].flatten(0, 1)[:seq_len]  # [S, Hkv, D]
            values = value_cache[span.first_block : end].flatten(0, 1)[:seq_len]
        elif span.block_ids is None:
            keys, values = key[span.start : span.end], value[span.start : span.end]
        else:
            keys = key_cache.index_select(0, span.block_ids).flatten(0, 1)[:seq_len]  # [S, Hkv, D]
            values = value_cache.index_select(0, span.block_ids).flatten(0, 1)[:seq_len]
        mask = None
        if span.block_ids is not None or span.first_block is not None or layer.sliding_window is not None:
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

    def _multi_token_slice(
        self,
        layer: Attention,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        span: MultiTokenSpan,
    ) -> torch.Tensor:
        """``_multi_token`` for a short span in consecutive blocks (a speculative verification, a
        draft's catch-up): its keys and values a slice of the cache, the
        query heads sharing a KV head folded into that head's query rows under the span's one
        mask (as a decode group's are: SDPA without its GQA path, no mask built per layer)."""
        seq_len, query_len = span.seq_len, span.end - span.start
        num_kv_heads, head_size = layer.num_kv_heads, layer.head_size
        group = layer.num_heads // num_kv_heads
        end = span.first_block + -(-seq_len // key_cache.shape[1])
        keys = key_cache[span.first_block : end].view(-1, num_kv_heads, head_size)[:seq_len].transpose(0, 1)[None]
        values = value_cache[span.first_block : end].view(-1, num_kv_heads, head_size)[:seq_len].transpose(0, 1)[None]
        # [Q, H, D] -> [1, Hkv, group * Q, D]: rows by head within the group, then by query.
        queries = query[span.start : span.end].view(query_len, num_kv_heads, group, head_size)
        queries = queries.permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * query_len, head_size)
        mask = span.mask(layer.sliding_window, query.dtype, group, query.device)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=layer.scale)
        return out.view(num_kv_heads, group, query_len, head_size).permute(2, 0, 1, 3).reshape(
            query_len, layer.num_heads, head_size)


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
    if mask.dtype == torch.bool:
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    else:  # a decode group's additive mask
        probs = (scores + mask).softmax(-1)
    out = probs.view(n, num_kv_heads, group * query_len, key_len) @ value.float()
    return out.view(n, num_heads, query_len, head_size).to(query.dtype)
