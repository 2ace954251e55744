"""The models bundled with pagedserve, so that it serves something real with no download.

They are small Llama and Mistral models trained on the Python standard library by
``scripts/train_tiny_model.py``, which also writes ``manifest.json`` (settings, checksums,
held-out perplexities) and each folder's model card. They are addressed by short names such as
``pagedserve/tiny-py``, resolved here before any hub lookup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = ASSETS_DIR / "manifest.json"

DEFAULT_MODEL = "pagedserve/tiny-py"
DRAFT_MODEL = "pagedserve/tiny-py-draft"
MISTRAL_MODEL = "pagedserve/tiny-py-mistral"
#: Short name -> folder under ``pagedserve/assets``.
BUNDLED_MODELS = {
    DEFAULT_MODEL: "tiny-py",
    DRAFT_MODEL: "tiny-py-draft",
    MISTRAL_MODEL: "tiny-py-mistral",
}


#: LoRA adapters of the bundled models: short name -> folder under ``pagedserve/assets``.
BUNDLED_ADAPTERS = {"pagedserve/tiny-py-lora-tests": "tiny-py-lora-tests"}


def bundled_adapter_path(name: str) -> Path | None:
    """The folder of the bundled adapter called ``name``, or None when it is not a short name."""
    folder = BUNDLED_ADAPTERS.get(name)
    return None if folder is None else ASSETS_DIR / folder


def bundled_model_path(name: str) -> Path | None:
    """The folder of the bundled model called ``name``, or None when ``name`` is not a short name."""
    folder = BUNDLED_MODELS.get(name)
    return None if folder is None else ASSETS_DIR / folder


def forward_flops_per_token(hf_config: Any, context: int) -> int:
    """Floating-point operations of one token's forward pass when it attends to ``context``
    tokens: every linear layer (the LM head included) and attention's scores and weighted sum,
    two per multiply-add. Embedding lookups, norms and activations are left out.

    This is the measure behind "the draft costs at most an eighth of the target"."""
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    window = getattr(hf_config, "sliding_window", None)
    attended = min(context, window) if window else context
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    per_layer = (
        hidden * (2 * q_size + 2 * kv_size)  # q, k, v and o projections
        + 3 * hidden * hf_config.intermediate_size  # gate, up and down projections
        + 2 * q_size * attended  # q·k scores and the weighted sum of values
    )
    return 2 * (hf_config.num_hidden_layers * per_layer + hidden * hf_config.vocab_size)
