"""Tiny random transformers checkpoints for tests, saved as safetensors in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

DEFAULT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    # Large enough that logits are far from uniform, so greedy choices are not float noise.
    "initializer_range": 0.15,
}


def make_tiny_model(
    directory: Path,
    architecture: str = "LlamaForCausalLM",
    vocab_size: int = 512,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Build a random ``architecture`` (a transformers class name), save it in ``directory``.

    Norm weights and biases are randomised too (HF initialises them to 1 and 0), so a test
    that loads them into the wrong place fails.
    """
    model_cls = getattr(transformers, architecture)
    config = model_cls.config_class(
        vocab_size=vocab_size, **{**DEFAULT_CONFIG, **config_overrides}
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory
