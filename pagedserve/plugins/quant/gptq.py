"""GPTQ checkpoints (``quant_method: "gptq"``) as AutoGPTQ and GPTQModel write them.

Per linear layer with ``K`` input and ``N`` output features, ``b`` bits (``per = 32 / b`` values
per int32) and group size ``g`` (``-1``: one group of all ``K``):

* ``qweight`` int32 ``[K / per, N]``: input features packed sequentially;
* ``qzeros`` int32 ``[K / g, N / per]``: zero points, output features packed sequentially. The
  classic format (``checkpoint_format: "gptq"``, the default) stores ``zero - 1``; GPTQModel's
  ``gptq_v2`` stores the zero itself;
* ``scales`` float16 ``[K / g, N]``;
* ``g_idx`` int32 ``[K]``: the group of each input feature. With ``desc_act`` (act-order) the
  features were quantized in order of decreasing activation size, so the groups are not
  contiguous; pagedserve sorts the features by group once at load time and gathers the input
  columns in the same order on every call.

``W[k, n] = (q[k, n] - zero[g_idx[k], n]) * s[g_idx[k], n]`` and the layer computes ``x @ W``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedserve.core.layers.quantization import LinearMethod, QuantizationConfig, set_weight_attrs
from pagedserve.plugins.quant.int_linear import PackedIntLinearMethod
from pagedserve.plugins.quant.packing import unpack_int32

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
#: checkpoint_format -> the offset its qzeros are stored with.
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, zero_offset: int, desc_act: bool = False) -> None:
        self.bits = bits
        self.group_size = group_size
        self.zero_offset = zero_offset
        self.desc_act = desc_act

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> GPTQConfig:
        if not hf_quant_config:
            raise ValueError(
                "quantization='gptq' needs a checkpoint quantized with GPTQ; this one is not. Make "
                "one with `pagedserve quantize MODEL OUT --method gptq`"
            )
        bits, group_size = hf_quant_config.get("bits"), hf_quant_config.get("group_size")
        fmt = hf_quant_config.get("checkpoint_format", hf_quant_config.get("format", "gptq"))
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ checkpoints with bits={bits} are not supported (supported: 4, 8)")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"GPTQ checkpoints with group_size={group_size} are not supported (supported: "
                f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))})"
            )
        if fmt not in ZERO_OFFSETS:
            raise ValueError(
                f"GPTQ checkpoint_format {fmt!r} is not supported (supported: "
                f"{', '.join(ZERO_OFFSETS)})"
            )
        if hf_quant_config.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported")
        if hf_quant_config.get("dynamic"):
            raise ValueError("GPTQ checkpoints with per-module overrides ('dynamic') are not supported")
        return cls(bits, group_size, ZERO_OFFSETS[fmt], bool(hf_quant_config.get("desc_act")))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        return GPTQLinearMethod(self.bits, self.group_size, self.zero_offset, self.desc_act)


def load_g_idx(param: torch.Tensor, loaded: torch.Tensor, shard_index: int | None) -> None:
    """A merged layer (qkv, gate_up) gets one ``g_idx`` per shard. The shards of a merged layer
    read the same input, so GPTQ derives the same act-order for each; keep the first and insist
    the others agree."""
    if loaded.shape != param.shape:
        raise ValueError(f"g_idx of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    if shard_index is None or bool((param < 0).all()):
        param.data.copy_(loaded)
    elif not torch.equal(param.data, loaded.to(param.dtype)):
        raise ValueError(
            "the shards of this merged layer have different act-order g_idx; pagedserve needs "
            "them equal (quantize the layers that share an input together)"
        )


#: Why act-order checkpoints cannot be split over the input features.
ACT_ORDER_ROW_PARALLEL = (
    "{prefix}: this GPTQ checkpoint uses act-order (desc_act), whose quantization groups are "
    "scattered over the input features, so a row-parallel layer's share of the features does not "
    "hold whole groups; use tensor_parallel_size=1, or a checkpoint quantized without desc_act"
)


def row_sharded(layer: nn.Module) -> bool:
    return getattr(layer, "parallel", "replicated") == "row" and getattr(layer, "tp_size", 1) > 1


class GPTQLinearMethod(PackedIntLinearMethod):
    def __init__(self, bits: int, group_size: int, zero_offset: int, desc_act: bool = False) -> None:
        super().__init__(bits, group_size)
        self.zero_offset = zero_offset
        self.desc_act = desc_act

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        if self.desc_act and row_sharded(layer):
            raise ValueError(ACT_ORDER_ROW_PARALLEL.format(prefix=layer.prefix))
        group = self.group_size_for(layer, input_size)
        self.check_output_sizes(layer, output_sizes)
        per = self.pack_factor
        if input_size % per:
            raise ValueError(f"{layer.prefix}: {input_size} input features do not pack into words of {per}")
        out, groups = sum(output_sizes), input_size // group
        tensors = {
            "qweight": (
                torch.empty(input_size // per, out, dtype=torch.int32),
                {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "pack_factor": per},
            ),
            "qzeros": (
                torch.empty(groups, out // per, dtype=torch.int32),
                {"input_dim": 0, "output_dim": 1, "packed_dim": 1, "pack_factor": per},
            ),
            "scales": (torch.empty(groups, out, dtype=params_dtype), {"input_dim": 0, "output_dim": 1}),
            "g_idx": (
                torch.full((input_size,), -1, dtype=torch.int32),  # -1: no shard loaded yet
                {"input_dim": 0, "weight_loader": load_g_idx},
            ),
        }
        for name, (tensor, attrs) in tensors.items():
            param = nn.Parameter(tensor, requires_grad=False)
            set_weight_attrs(param, attrs)
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        mask = (1 << self.bits) - 1
        values = unpack_int32(layer.qweight.data, self.bits, 0)
        # The classic format's zero - 1 wraps a zero of 0 to 2**bits - 1; adding the offset back
        # modulo 2**bits reads it as the 0 the quantizer meant.
        zeros = (unpack_int32(layer.qzeros.data, self.bits, 1) + self.zero_offset) & mask
        groups = zeros.shape[0]
        group = values.shape[0] // groups
        g_idx = layer.g_idx.data.long()
        if row_sharded(layer):  # this rank's features number their groups from its first one
            g_idx = g_idx - g_idx.min()
        contiguous = torch.arange(values.shape[0], device=g_idx.device) // group
        perm = None
        if not torch.equal(g_idx, contiguous):
            if row_sharded(layer):  # act-order the config did not declare
                raise ValueError(ACT_ORDER_ROW_PARALLEL.format(prefix=layer.prefix))
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], contiguous):
                raise ValueError(
                    f"{layer.prefix}: g_idx does not put {group} input features in each of its "
                    f"{groups} groups; the checkpoint is inconsistent"
                )
            values = values[perm]
        del layer.g_idx
        self.set_packed_weights(layer, values, zeros, layer.scales.data, perm)
