"""Well-known model shapes, built in by name so that ``pagedserve plan`` needs no download: the
values of each model's public ``config.json`` on the Hugging Face hub (as published; weights
and tokenizer are not needed to plan)."""

from __future__ import annotations

from typing import Any

_LLAMA_3_1: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

#: Hub id -> config.json values.
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": {
        **_LLAMA_3_1,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
    },
    "meta-llama/Llama-3.1-70B": {
        **_LLAMA_3_1,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
    },
    "mistralai/Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000,
    },
}

#: Short names users type: the instruct variants share their base model's shape.
_ALIASES = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-v0.1": "mistralai/Mistral-7B-v0.1",
}


def builtin_shape(name: str) -> tuple[str, dict[str, Any]] | None:
    """The hub id and config values of a built-in shape (case-insensitive, with or without the
    organisation), or None."""
    key = name.lower()
    for hub_id in BUILTIN_SHAPES:
        if key == hub_id.lower():
            return hub_id, dict(BUILTIN_SHAPES[hub_id])
    hub_id = _ALIASES.get(key.rsplit("/", 1)[-1])
    return (hub_id, dict(BUILTIN_SHAPES[hub_id])) if hub_id else None


def builtin_names() -> list[str]:
    return [*BUILTIN_SHAPES, *sorted(_ALIASES)]
