"""Gemma 2: embeddings scaled by sqrt(hidden), ``(1 + w)`` RMSNorms before and after both the
attention and the MLP, GeGLU (``hidden_activation``), scores scaled by ``query_pre_attn_scalar``
and soft-capped (``attn_logit_softcapping``), final logits soft-capped
(``final_logit_softcapping``), sliding-window and global layers interleaved (``layer_types``)."""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.decoder import DecoderForCausalLM, DecoderOptions, sliding_windows_from_config


class Gemma2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(
            hidden_act=getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act,
            qkv_bias=bias,
            o_bias=bias,
            norm_weight_offset=1.0,
            embedding_scale=hf_config.hidden_size**0.5,
            sandwich_norms=True,
            attention_scale=hf_config.query_pre_attn_scalar**-0.5,
            attn_logit_softcap=getattr(hf_config, "attn_logit_softcapping", None),
            final_logit_softcap=getattr(hf_config, "final_logit_softcapping", None),
            sliding_windows=sliding_windows_from_config(hf_config, None),
        )
