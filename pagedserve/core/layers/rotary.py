"""Rotary position embeddings (neox style, as HF Llama) with a cos/sin cache indexed by position.

The inverse frequencies of the scaled variants come from transformers' ``ROPE_INIT_FUNCTIONS``,
so they match HF exactly. One difference is deliberate: ``dynamic`` (NTK) scaling. HF recomputes
the frequencies per forward from the longest position in the batch, so a token's embedding depends
on what it is batched with and on how long its sequence has grown. A paged cache needs each
token's K to stay valid once written, so (like vLLM) we fix the scaling at the maximum length
``max_position * factor``: equal to HF when HF sees a sequence of that length, different (more
stretched) for shorter ones. ``longrope`` is fixed the same way (see ``get_rope``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
#: Older names of the same rope types.
ROPE_TYPE_ALIASES = {"su": "longrope"}
#: Types whose parameters include the pretraining context length.
NEEDS_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope", "su")


class RotaryEmbedding(nn.Module):
    """Rotates the first ``rotary_dim`` features of every head of q and k by position."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        inv_freq: torch.Tensor,
        max_len: int,
        attention_scaling: float = 1.0,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_len = max_len
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq.float())
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_scaling
        #: [max_len, rotary_dim]: cos then sin of each frequency, kept in fp32.
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's rotation, computed once and shared by every layer: ``cos`` [T, 1, 1, half]
        and ``sin`` [T, 1, 2, half] with the first half negated, in ``dtype`` (as HF casts them)."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).to(dtype).chunk(2, dim=-1)
        return cos[:, None, None, :], torch.stack((-sin, sin), dim=1)[:, None]

    def rotate(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate every head of ``x`` [T, heads * head_size] (a strided view is fine) by the step's
        ``cos_sin``; returns a new contiguous [T, heads * head_size].

        Each head's rotated part is viewed as its two halves [2, half], so ``x1 * cos - x2 * sin``
        and ``x2 * cos + x1 * sin`` (HF's ``q * cos + rotate_half(q) * sin``, the same products and
        sums) are ``x * cos + x.flip(halves) * (-sin, sin)``: four ops for any number of heads."""
        heads = x.view(x.shape[0], -1, self.head_size)
        half = self.rotary_dim // 2
        part = heads[..., : self.rotary_dim].unflatten(-1, (2, half))
        cos, sin = cos_sin
        rotated = (part * cos + part.flip(2) * sin).flatten(-2)
        if self.rotary_dim < self.head_size:
            rotated = torch.cat((rotated, heads[..., self.rotary_dim :]), dim=-1)
        return rotated.reshape(x.shape[0], -1)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [T]; ``query`` [T, H*D], ``key`` [T, Hkv*D] -> rotated (same shapes)."""
        cos_sin = self.cos_sin(positions, query.dtype)
        return self.rotate(query, cos_sin), self.rotate(key, cos_sin)

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, max_len={self.max_len}"


def rope_parameters_from_config(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling or None)`` from a config in either layout: transformers 5's
    ``rope_parameters`` (theta and type in one dict) or the older ``rope_theta`` + ``rope_scaling``.

    ``original_max_position_embeddings`` kept beside the scaling (Phi-3 does) is moved into it.
    """
    params = dict(
        getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    )
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    params.pop("partial_rotary_factor", None)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    original = getattr(hf_config, "original_max_position_embeddings", None)
    if rope_type in NEEDS_ORIGINAL_LENGTH and "original_max_position_embeddings" not in params and original:
        params["original_max_position_embeddings"] = original
    return float(theta), params


def rotary_dim_from_config(hf_config: Any, head_size: int) -> int:
    """The rotated part of each head: ``head_size * partial_rotary_factor`` (1 when unset), the
    factor read from ``rope_parameters`` (transformers 5) or the config itself (older)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor") or getattr(hf_config, "partial_rotary_factor", None) or 1.0
    return int(head_size * factor)


def rope_max_len(max_position: int, rope_scaling: dict[str, Any] | None) -> int:
    """Positions the cos/sin cache covers: ``linear``/``dynamic`` stretch ``max_position`` by their
    factor, ``yarn`` reaches ``original_max_position_embeddings * factor``; ``llama3`` and
    ``longrope`` configs already state the extended ``max_position``."""
    scaling = rope_scaling or {}
    rope_type = ROPE_TYPE_ALIASES.get(scaling.get("rope_type") or scaling.get("type"), None)
    rope_type = rope_type or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type in ("linear", "dynamic"):
        return int(max_position * scaling["factor"])
    if rope_type == "yarn" and scaling.get("factor"):
        original = scaling.get("original_max_position_embeddings", max_position)
        return max(max_position, int(original * scaling["factor"]))
    return max_position


def get_rope(
    head_size: int,
    rotary_dim: int,
    max_position: int,
    rope_theta: float,
    rope_scaling: dict[str, Any] | None,
) -> RotaryEmbedding:
    """Build the rotary embedding for ``rope_scaling`` (None = default; else a dict with
    ``rope_type`` (or legacy ``type``) and that type's parameters as HF configs spell them).

    ``longrope`` (Phi-3; legacy name ``su``) has a short and a long set of factors, and HF switches
    between them per forward by the longest sequence in the batch (short up to
    ``original_max_position_embeddings``). As with ``dynamic``, a paged cache cannot let a
    token's rotation depend on its batch, so the set is fixed by the context the cache serves:
    the long factors when ``max_position`` exceeds the original length (equal to HF for sequences
    longer than it), else the short ones.
    """
    scaling = dict(rope_scaling or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    rope_type = ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        inv_freq = 1.0 / (rope_theta**exponents)
        return RotaryEmbedding(head_size, rotary_dim, inv_freq, max_position)
    if rope_type in NEEDS_ORIGINAL_LENGTH:
        scaling.setdefault("original_max_position_embeddings", max_position)

    max_len = rope_max_len(max_position, {**scaling, "rope_type": rope_type})
    # The HF init functions read a config; this one describes just the rotated part of a head.
    rope_config = PretrainedConfig(
        head_dim=rotary_dim,
        hidden_size=rotary_dim,
        num_attention_heads=1,
        max_position_embeddings=max_position,
        rope_parameters={**scaling, "rope_type": rope_type, "rope_theta": rope_theta},
    )
    seq_len = max_len if rope_type in ("dynamic", "longrope") else None
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](rope_config, None, seq_len=seq_len)
    return RotaryEmbedding(head_size, rotary_dim, inv_freq, max_len, attention_scaling)
