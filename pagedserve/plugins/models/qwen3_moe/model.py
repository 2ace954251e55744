"""Qwen3-MoE: Qwen3's attention; a sparse MLP (``num_experts`` of ``moe_intermediate_size``,
``num_experts_per_tok`` per token, renormalised when ``norm_topk_prob``) in every
``decoder_sparse_step``-th layer not listed in ``mlp_only_layers``, a dense one elsewhere."""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.decoder import (
    DecoderForCausalLM,
    DecoderOptions,
    MoEOptions,
    sliding_windows_from_config,
)
from pagedserve.plugins.models.qwen3.model import qwen3_attention


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        step = getattr(hf_config, "decoder_sparse_step", 1) or 1
        dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
        sparse = frozenset(
            i
            for i in range(hf_config.num_hidden_layers)
            if i not in dense and hf_config.num_experts > 0 and (i + 1) % step == 0
        )
        return DecoderOptions(
            hidden_act=hf_config.hidden_act,
            sliding_windows=sliding_windows_from_config(hf_config, getattr(hf_config, "sliding_window", None)),
            moe=MoEOptions(
                num_experts=hf_config.num_experts,
                top_k=hf_config.num_experts_per_tok,
                intermediate_size=hf_config.moe_intermediate_size,
                renormalize=bool(getattr(hf_config, "norm_topk_prob", False)),
                sparse_layers=sparse,
            ),
            **qwen3_attention(hf_config),
        )
