"""Llama (Llama 2/3/3.1/3.2 and every checkpoint shaped like them) as the shared decoder.

Reads HF ``LlamaConfig`` keys: GQA (``num_key_value_heads``), an explicit ``head_dim``,
``attention_bias``/``mlp_bias``, ``tie_word_embeddings`` and RoPE scaling in either the
transformers 5 (``rope_parameters``) or the older (``rope_theta`` + ``rope_scaling``) layout.
"""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.config_file import ModelConfigFile, config_from_values
from pagedserve.plugins.models.decoder import DecoderForCausalLM, DecoderOptions, sliding_windows_from_config

#: transformers' ``LlamaConfig`` defaults for the keys a config.json may leave out.
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_parameters": None,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
}


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> ModelConfigFile | None:
        """A ``model_type: llama`` config.json as ``LlamaConfig`` reads it (its defaults, the
        head size and KV heads it derives), without importing it; None for anything else."""
        config = config_from_values(values, "llama", LLAMA_DEFAULTS)
        if config is None:
            return None
        if config.hidden_size % config.num_attention_heads != 0:  # as LlamaConfig refuses it
            raise ValueError(
                f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                f"heads ({config.num_attention_heads})."
            )
        if config.head_dim is None:
            config.head_dim = config.hidden_size // config.num_attention_heads
        if config.num_key_value_heads is None:
            config.num_key_value_heads = config.num_attention_heads
        if config.rope_parameters is None:
            theta = values.get("rope_theta", 10000.0)
            config.rope_parameters = {"rope_theta": theta, "rope_type": "default"}
        return config

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
