"""``pagedserve quantize --method fp8``: float8 e4m3 weights with per-channel (or per-tensor)
scales, written in the compressed-tensors format llm-compressor uses (its ``FP8_DYNAMIC`` scheme
for per-channel scales: activations are quantized per token at run time, so no calibration)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from pagedserve.plugins.quant.checkpoint_io import linear_layer_names, source_tensors, write_checkpoint
from pagedserve.plugins.quant.fp8 import quantize_fp8


def compressed_tensors_settings(strategy: str) -> dict[str, object]:
    """The ``quantization_config`` of FP8 weights (``strategy`` channel or tensor) with dynamic
    per-token FP8 activations."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    group = {
        "targets": ["Linear"],
        "weights": {**fp8, "strategy": strategy, "dynamic": False},
        "input_activations": {**fp8, "strategy": "token", "dynamic": True},
        "output_activations": None,
        "format": "float-quantized",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


@torch.no_grad()
def quantize_fp8_checkpoint(source: Path, out: Path, per_channel: bool) -> None:
    linears = linear_layer_names(source)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(list(source_tensors(source)), desc="FP8 tensors"):
        module, _, kind = name.rpartition(".")
        if module in linears and kind == "weight":
            weight, scale = quantize_fp8(tensor, per_channel)
            tensors[name], tensors[f"{module}.weight_scale"] = weight, scale
        else:
            tensors[name] = tensor
    settings = compressed_tensors_settings("channel" if per_channel else "tensor")
    write_checkpoint(source, out, tensors, settings)
