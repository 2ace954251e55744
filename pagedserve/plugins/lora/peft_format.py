"""The PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``, as ``peft`` saves.

Reads ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` and the
weights' ``...<module>.lora_A.weight`` / ``lora_B.weight`` pairs; the modules are whatever the
weights name (``target_modules`` as names, a regex or "all-linear" only decided which ones PEFT
made). Everything the engine cannot serve is refused here, at load time, naming the field.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from pagedserve.plugins.lora.weights import LoRAAdapterWeights, LoRAModuleWeights

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

#: Config fields that must be unset (None / false / empty): what each one would need.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "modules_to_save": "fully trained copies of modules (modules_to_save) are not LoRA deltas",
    "use_dora": "DoRA (use_dora) adds a magnitude vector per module",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers, GPT-2 style) has no Linear here",
    "trainable_token_indices": "trained embedding rows (trainable_token_indices)",
    "layer_replication": "layer_replication changes the base model's layers",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora)",
}
#: Base-model parts a LoRA may not target here (only the linear layers have a LoRA slot).
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head", "wte", "embed_out")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _read_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    return config


def _check_config(config: dict[str, Any], max_lora_rank: int) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"peft_type is {peft_type!r}; only LORA adapters are served")
    for name, what in UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise ValueError(f"{name}={config[name]!r} is not supported: {what}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"bias={config['bias']!r} is not supported (trained biases); use bias='none'")
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"r must be a positive integer, got {rank!r}")
    ranks = [rank, *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        raise ValueError(
            f"r={max(ranks)} exceeds max_lora_rank={max_lora_rank}; start the engine with a larger "
            "max_lora_rank"
        )
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for target in names:
        if target in UNSUPPORTED_TARGETS or any(target.endswith(f".{t}") for t in UNSUPPORTED_TARGETS):
            raise ValueError(
                f"target_modules includes {target!r}: LoRA on embeddings or lm_head is not supported"
            )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class PEFTFormat:
    """Loads adapters saved by ``PeftModel.save_pretrained``."""

    @staticmethod
    def matches(path: str) -> bool:
        return os.path.isfile(os.path.join(path, CONFIG_FILE))

    @staticmethod
    def load(path: str, max_lora_rank: int) -> LoRAAdapterWeights:
        from safetensors.torch import load_file

        config = _read_config(path)
        _check_config(config, max_lora_rank)
        weights_path = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights_path):
            pickled = [name for name in PICKLE_FILES if os.path.isfile(os.path.join(path, name))]
            if pickled:
                raise ValueError(
                    f"{os.path.join(path, pickled[0])} is a pickle checkpoint, which can run code "
                    f"when loaded; only {WEIGHTS_FILE} is read (convert it with "
                    "PeftModel.save_pretrained(..., safe_serialization=True))"
                )
            raise ValueError(f"{path} has no {WEIGHTS_FILE}")
        tensors = load_file(weights_path)
        pairs: dict[str, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            if "lora_embedding_" in key:
                raise ValueError(f"{key}: LoRA on embeddings is not supported")
            if "lora_magnitude_vector" in key:
                raise ValueError(f"{key}: DoRA (use_dora) is not supported")
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"{key} is not a LoRA weight (modules_to_save or another method?)")
            module = match["module"]
            if module.rsplit(".", 1)[-1] in UNSUPPORTED_TARGETS:
                raise ValueError(f"{key}: LoRA on embeddings or lm_head is not supported")
            pairs.setdefault(module, {})[match["which"]] = tensor

        alpha = config.get("lora_alpha", config["r"])
        adapter = LoRAAdapterWeights(path=path)
        for module, pair in sorted(pairs.items()):
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{module} has lora_{''.join(pair)} but not both lora_A and lora_B")
            lora_a, lora_b = pair["A"].float(), pair["B"].float()
            if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
                raise ValueError(
                    f"{module}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} are "
                    "not a rank-r pair"
                )
            rank = lora_a.shape[0]
            if rank > max_lora_rank:
                raise ValueError(f"{module}: rank {rank} exceeds max_lora_rank={max_lora_rank}")
            module_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
            denominator = math.sqrt(rank) if config.get("use_rslora") else rank
            adapter.modules[module] = LoRAModuleWeights(lora_a, lora_b, module_alpha / denominator)
        if not adapter.modules:
            raise ValueError(f"{weights_path} holds no LoRA weights")
        return adapter
