"""FP8 checkpoints in the compressed-tensors format (``quant_method: "compressed-tensors"``), as
llm-compressor writes them.

The ``quantization_config`` holds ``config_groups``, each a scheme (``weights``,
``input_activations``) with ``targets`` (the class name ``Linear``, module names, or ``re:``
regular expressions), plus an ``ignore`` list in the same syntax. pagedserve reads the FP8 schemes
(``format`` ``float-quantized``): ``weight`` float8_e4m3fn ``[N, K]`` with ``weight_scale``
``[N, 1]`` (``strategy: channel``) or ``[1]`` (``strategy: tensor``), and for static activation
schemes an ``input_scale`` ``[1]``. Names are matched against pagedserve's layer names, whose
merged layers are ``qkv_proj`` and ``gate_up_proj``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from pagedserve.core.layers.quantization import LinearMethod, QuantizationConfig, UnquantizedLinearMethod
from pagedserve.plugins.quant.fp8 import Fp8LinearMethod

SUPPORTED_FORMATS = ("float-quantized", "naive-quantized")
SUPPORTED_WEIGHT_STRATEGIES = ("tensor", "channel")


def _matches(pattern: str, prefix: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], prefix) is not None
    return pattern == "Linear" or prefix == pattern or prefix.endswith("." + pattern)


def _scheme_method(name: str, scheme: dict[str, Any]) -> Fp8LinearMethod:
    """The method for one config group, or a ValueError saying what it uses that is unsupported."""
    weights = scheme.get("weights") or {}
    kind = f"{weights.get('type')} {weights.get('num_bits')}-bit weights"
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ValueError(
            f"compressed-tensors group {name!r} has {kind}; pagedserve reads the FP8 (float 8-bit) "
            f"schemes of compressed-tensors (for int4 use an AWQ or GPTQ checkpoint)"
        )
    strategy = weights.get("strategy")
    symmetric, dynamic = weights.get("symmetric", True), weights.get("dynamic", False)
    if strategy not in SUPPORTED_WEIGHT_STRATEGIES or not symmetric or dynamic:
        raise ValueError(
            f"compressed-tensors group {name!r}: FP8 weights with strategy={strategy!r}, "
            f"symmetric={symmetric}, dynamic={dynamic} are not "
            f"supported (supported: symmetric, static, strategy tensor or channel)"
        )
    activations = scheme.get("input_activations")
    static_input = activations is not None and not activations.get("dynamic", False)
    if static_input and activations.get("strategy") != "tensor":
        raise ValueError(
            f"compressed-tensors group {name!r}: static input scales with strategy "
            f"{activations.get('strategy')!r} are not supported (only 'tensor')"
        )
    return Fp8LinearMethod(serialized=True, per_channel=strategy == "channel", static_input=static_input)


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], Fp8LinearMethod]], ignore: list[str]) -> None:
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> CompressedTensorsConfig:
        if not hf_quant_config:
            raise ValueError(
                "quantization='compressed-tensors' needs a compressed-tensors checkpoint; for "
                "quantizing an unquantized one while loading use quantization='fp8'"
            )
        fmt = hf_quant_config.get("format")
        if fmt not in SUPPORTED_FORMATS:
            raise ValueError(
                f"compressed-tensors format {fmt!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_FORMATS)}, i.e. FP8 checkpoints)"
            )
        groups = [
            (list(scheme.get("targets") or []), _scheme_method(name, scheme))
            for name, scheme in (hf_quant_config.get("config_groups") or {}).items()
        ]
        if not groups:
            raise ValueError("this compressed-tensors checkpoint declares no config_groups")
        return cls(groups, list(hf_quant_config.get("ignore") or []))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        if any(_matches(pattern, prefix) for pattern in self.ignore):
            return UnquantizedLinearMethod()
        for targets, method in self.groups:
            if any(_matches(target, prefix) for target in targets):
                return method  # methods keep their state on the layer, so layers can share one
        return UnquantizedLinearMethod()
