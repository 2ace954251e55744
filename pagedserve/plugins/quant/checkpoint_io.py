"""Reading a dense checkpoint and writing a quantized one next to its tokenizer files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve.core.loader import SAFETENSORS_INDEX, iterate_weights, safetensors_files

#: Files copied unchanged from the source folder (tokenizer, generation settings, templates).
COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def source_tensors(source: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the source checkpoint (safetensors only, like the loader)."""
    return iterate_weights(safetensors_files(str(source)))


def linear_layer_names(source: Path) -> set[str]:
    """The names of the model's ``nn.Linear`` layers, the output embedding (LM head) excepted,
    found on a weightless (meta) instance of the model."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return {
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head
    }


def copy_side_files(source: Path, out: Path) -> None:
    """Tokenizer and generation files; not the config (rewritten) nor the weights."""
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(source).iterdir():
        rewritten = item.name in ("config.json", SAFETENSORS_INDEX)
        if item.is_file() and item.suffix in COPIED_SUFFIXES and not rewritten:
            shutil.copy(item, out / item.name)


def write_checkpoint(
    source: Path,
    out: Path,
    tensors: dict[str, torch.Tensor],
    quantization_config: dict[str, Any],
    side_config_file: str | None = None,
) -> None:
    """``out``: the tensors, the source's config.json with ``quantization_config`` added, the
    source's tokenizer files, and (for tools that read one) the settings as ``side_config_file``."""
    copy_side_files(source, out)
    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    save_file(contiguous, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((Path(source) / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if side_config_file is not None:
        (out / side_config_file).write_text(json.dumps(quantization_config, indent=2) + "\n")
