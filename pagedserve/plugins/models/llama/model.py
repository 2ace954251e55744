"""Llama (Llama 2/3/3.1/3.2 and every checkpoint shaped like them) as the shared decoder.

Reads HF ``LlamaConfig`` keys: GQA (``num_key_value_heads``), an explicit ``head_dim``,
``attention_bias``/``mlp_bias``, ``tie_word_embeddings`` and RoPE scaling in either the
transformers 5 (``rope_parameters``) or the older (``rope_theta`` + ``rope_scaling``) layout.
"""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.decoder import DecoderForCausalLM, DecoderOptions, sliding_windows_from_config


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def sliding_window(cls, hf_config: Any) -> int | None:
        """Llama attends to the whole context."""
        return None

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(
            hidden_act=hf_config.hidden_act,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            sliding_windows=sliding_windows_from_config(hf_config, cls.sliding_window(hf_config)),
        )
