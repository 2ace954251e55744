"""Qwen3: Qwen2 without the q/k/v biases (``attention_bias``, off by default) and with an
RMSNorm over each head of q and of k before the rotary embedding."""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.decoder import DecoderForCausalLM, DecoderOptions, sliding_windows_from_config


def qwen3_attention(hf_config: Any) -> dict[str, Any]:
    """The attention options Qwen3 and Qwen3-MoE share."""
    bias = bool(getattr(hf_config, "attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True}


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return DecoderOptions(
            hidden_act=hf_config.hidden_act,
            sliding_windows=sliding_windows_from_config(hf_config, None),
            **qwen3_attention(hf_config),
        )
