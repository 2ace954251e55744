"""Paged attention in plain PyTorch: scatter K/V by slot, gather by block table, SDPA with an
explicit mask. Slow on a GPU but simple enough to be the reference every kernel is tested against.

Pure-decode requests (one new token) are attended together in one padded batch, which is also
the CPU fast path; the others (prefill, chunked prefill, speculative verification) one by one.
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

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class TorchRefMetadata:
    layout: BatchLayout
    #: The requests with a single new token (attended as one batch) and their token indices.
    decode_reqs: torch.Tensor
    decode_tokens: torch.Tensor
    #: [num_decode, 1]: the position of each decode query.
    decode_query_positions: torch.Tensor
    #: [max_decode_seq_len]: key positions of the padded decode batch.
    decode_key_positions: torch.Tensor
    #: The other requests: (request index, first token, end token).
    other_spans: list[tuple[int, int, int]]
    #: Decode masks by sliding window (None = full), built by the first layer that needs one.
    decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, sliding_window: int | None) -> torch.Tensor:
        """[num_decode, 1, 1, max_decode_seq_len], True where a key is attended."""
        mask = self.decode_masks.get(sliding_window)
        if mask is None:
            keys = self.decode_key_positions[None, :]
            mask = keys <= self.decode_query_positions
            if sliding_window is not None:
                mask &= keys > self.decode_query_positions - sliding_window
            mask = mask[:, None, None, :]
            self.decode_masks[sliding_window] = mask
        return mask


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
        decode, other, start = [], [], 0
        for i, query_len in enumerate(layout.query_lens_list):
            if query_len == 1:
                decode.append(i)
            elif query_len > 1:
                other.append((i, start, start + query_len))
            start += query_len
        decode_reqs = torch.tensor(decode, dtype=torch.long, device=device)
        max_decode_len = max((layout.seq_lens_list[i] for i in decode), default=0)
        query_positions = (layout.seq_lens[decode_reqs].long() - 1)[:, None]
        key_positions = torch.arange(max_decode_len, device=device)
        return TorchRefMetadata(
            layout=layout,
            decode_reqs=decode_reqs,
            decode_tokens=layout.query_start_loc[decode_reqs].long(),
            decode_query_positions=query_positions,
            decode_key_positions=key_positions,
            other_spans=other,
        )

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
        key_cache.view(slots)[layout.slot_mapping] = key.to(key_cache.dtype)
        value_cache.view(slots)[layout.slot_mapping] = value.to(value_cache.dtype)

        out = torch.empty_like(query)
        if metadata.decode_reqs.numel():
            decoded = self._decode(layer, query, key_cache, value_cache, metadata)
            out[metadata.decode_tokens] = decoded
        for i, start, end in metadata.other_spans:
            out[start:end] = self._one_request(
                layer, query[start:end], key_cache, value_cache, layout, i
            )
        return out

    def _decode(
        self,
        layer: Attention,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: TorchRefMetadata,
    ) -> torch.Tensor:
        """All single-token requests at once, their contexts padded to the longest."""
        layout = metadata.layout
        max_len = metadata.decode_key_positions.numel()
        num_blocks = -(-max_len // layout.block_size)
        tables = layout.block_tables[metadata.decode_reqs, :num_blocks].long()
        # Padding past a request's context is masked out; the runner zero-fills the cache, so
        # slots never written hold finite values that the mask cancels.
        keys = key_cache[tables].flatten(1, 2)[:, :max_len]  # [N, L, Hkv, D]
        values = value_cache[tables].flatten(1, 2)[:, :max_len]
        queries = query[metadata.decode_tokens].unsqueeze(2)  # [N, H, 1, D]
        out = _attend(
            layer,
            queries,
            keys.transpose(1, 2),
            values.transpose(1, 2),
            metadata.decode_mask(layer.sliding_window),
        )
        return out.squeeze(2)

    def _one_request(
        self,
        layer: Attention,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        layout: BatchLayout,
        index: int,
    ) -> torch.Tensor:
        """One request's new tokens against its whole context (causal at absolute positions)."""
        seq_len = layout.seq_lens_list[index]
        query_len = layout.query_lens_list[index]
        blocks = layout.block_tables[index, : -(-seq_len // layout.block_size)].long()
        keys = key_cache[blocks].flatten(0, 1)[:seq_len]  # [S, Hkv, D]
        values = value_cache[blocks].flatten(0, 1)[:seq_len]
        key_positions = torch.arange(seq_len, device=query.device)[None, :]
        query_positions = key_positions[:, seq_len - query_len :].T
        mask = key_positions <= query_positions
        if layer.sliding_window is not None:
            mask &= key_positions > query_positions - layer.sliding_window
        out = _attend(
            layer,
            query.transpose(0, 1).unsqueeze(0),
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
    mask: torch.Tensor,
) -> torch.Tensor:
    """SDPA over [N, H, Lq, D] queries and [N, Hkv, Lk, D] keys/values (SDPA's own GQA/MQA
    grouping, no copies of the KV heads); half-precision inputs are computed in fp32."""
    dtype = query.dtype
    if dtype in _HALF_DTYPES:
        query, key, value = query.float(), key.float(), value.float()
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        scale=layer.scale,
        enable_gqa=layer.num_heads != layer.num_kv_heads,
    )
    return out.to(dtype)
