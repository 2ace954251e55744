"""Mixtral: Mistral's attention with a sparse MLP in every layer (``num_local_experts`` experts,
``num_experts_per_tok`` per token, weights renormalised over the chosen ones). The checkpoint
names the MLP ``block_sparse_moe`` and each expert's projections ``w1`` (gate), ``w3`` (up) and
``w2`` (down)."""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.decoder import (
    DecoderForCausalLM,
    DecoderOptions,
    MoEOptions,
    sliding_windows_from_config,
)


class MixtralForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return DecoderOptions(
            hidden_act=hf_config.hidden_act,
            sliding_windows=sliding_windows_from_config(hf_config, getattr(hf_config, "sliding_window", None)),
            moe=MoEOptions(
                num_experts=hf_config.num_local_experts,
                top_k=hf_config.num_experts_per_tok,
                intermediate_size=hf_config.intermediate_size,
                renormalize=True,
                sparse_layers=frozenset(range(hf_config.num_hidden_layers)),
            ),
            weight_renames=((".block_sparse_moe.", ".mlp."),),
            expert_weights={"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None)},
        )
