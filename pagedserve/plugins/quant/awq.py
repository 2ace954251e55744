"""AWQ checkpoints in AutoAWQ's GEMM layout (``quant_method: "awq"``, ``version: "gemm"``).

Per linear layer with ``K`` input and ``N`` output features and group size ``g``:

* ``qweight`` int32 ``[K, N / 8]``: 4-bit values, output features packed in AWQ's interleaved
  order (``packing.AWQ_PACK_ORDER``);
* ``qzeros`` int32 ``[K / g, N / 8]``: the zero points, packed the same way;
* ``scales`` float16 ``[K / g, N]``.

``W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]`` and the layer computes ``x @ W``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedserve.core.layers.quantization import (
    LinearMethod,
    QuantizationConfig,
    UnquantizedLinearMethod,
    set_weight_attrs,
)
from pagedserve.plugins.quant.int_linear import PackedIntLinearMethod
from pagedserve.plugins.quant.packing import awq_to_sequential, unpack_int32

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


class AWQConfig(QuantizationConfig):
    """Reads transformers' ``quantization_config`` keys (``bits``, ``group_size``, ``zero_point``,
    ``version``, ``modules_to_not_convert``) and the older ``quant_config.json`` spelling
    (``w_bit``, ``q_group_size``)."""

    name = "awq"

    def __init__(self, group_size: int, modules_to_not_convert: list[str]) -> None:
        self.group_size = group_size
        self.modules_to_not_convert = modules_to_not_convert

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> AWQConfig:
        if not hf_quant_config:
            raise ValueError(
                "quantization='awq' needs a checkpoint quantized with AWQ; this one is not. Make "
                "one with `pagedserve quantize MODEL OUT --method awq`, or use quantization='fp8', "
                "which quantizes an unquantized checkpoint while loading"
            )
        bits = hf_quant_config.get("bits", hf_quant_config.get("w_bit"))
        group_size = hf_quant_config.get("group_size", hf_quant_config.get("q_group_size"))
        version = str(hf_quant_config.get("version", "gemm")).lower()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"AWQ checkpoints with bits={bits} are not supported (supported: 4)")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"AWQ checkpoints with group_size={group_size} are not supported (supported: "
                f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))})"
            )
        if not hf_quant_config.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points (zero_point=false) are not supported")
        if version != "gemm":
            raise ValueError(
                f"AWQ version {version!r} is not supported: pagedserve reads AutoAWQ's GEMM layout "
                f"(version 'gemm'); re-quantize with version='GEMM'"
            )
        return cls(group_size, list(hf_quant_config.get("modules_to_not_convert") or []))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        if any(name in prefix for name in self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self.group_size)


class AWQLinearMethod(PackedIntLinearMethod):
    def __init__(self, group_size: int) -> None:
        super().__init__(bits=4, group_size=group_size)

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        group = self.group_size_for(layer, input_size)
        self.check_output_sizes(layer, output_sizes)
        out, per = sum(output_sizes), self.pack_factor
        packed = {"input_dim": 0, "output_dim": 1, "packed_dim": 1, "pack_factor": per}
        tensors = {
            "qweight": (torch.empty(input_size, out // per, dtype=torch.int32), packed),
            "qzeros": (torch.empty(input_size // group, out // per, dtype=torch.int32), packed),
            "scales": (
                torch.empty(input_size // group, out, dtype=params_dtype),
                {"input_dim": 0, "output_dim": 1},
            ),
        }
        for name, (tensor, attrs) in tensors.items():
            param = nn.Parameter(tensor, requires_grad=False)
            set_weight_attrs(param, attrs)
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        values = awq_to_sequential(unpack_int32(layer.qweight.data, self.bits, 1))
        zeros = awq_to_sequential(unpack_int32(layer.qzeros.data, self.bits, 1))
        self.set_packed_weights(layer, values, zeros, layer.scales.data, None)
