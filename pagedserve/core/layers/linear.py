"""The linear layer model code uses: its weights and matmul belong to the chosen quant method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pagedserve.core.forward_context import get_lora_mapping
from pagedserve.core.layers.quantization import (
    QuantizationConfig,
    UnquantizedLinearMethod,
    set_weight_attrs,
)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy a checkpoint tensor into a parameter of the same shape (casting its dtype)."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit a parameter of "
            f"shape {tuple(param.shape)}"
        )
    param.data.copy_(loaded_weight)


class Linear(nn.Module):
    """``y = x @ W.T + b``; with several ``output_sizes`` it is a merged layer (qkv, gate_up)
    whose output is the concatenation of its shards, each loaded from its own HF weight.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: int | list[int],
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.prefix = prefix
        params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_method = (
            quant_config.get_linear_method(self, prefix)
            if quant_config is not None
            else UnquantizedLinearMethod()
        )
        self.quant_method.create_weights(self, input_size, self.output_sizes, params_dtype)
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.output_size, dtype=params_dtype), requires_grad=False
            )
            set_weight_attrs(self.bias, {"output_dim": 0})
        else:
            self.register_parameter("bias", None)
        #: The LoRA slot: a callable ``(x, base_output, lora_mapping) -> output`` set by the LoRA
        #: manager, called only in steps whose forward context holds a mapping.
        self.lora_adapter: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_index: int | None = None
    ) -> None:
        """Load a whole parameter, or shard ``shard_index`` of a merged one along ``output_dim``;
        a parameter with its own ``weight_loader`` attribute loads itself."""
        if shard_index is not None and not 0 <= shard_index < self.num_shards:
            raise ValueError(f"{self.prefix}: shard {shard_index} of {self.num_shards} does not exist")
        own_loader = getattr(param, "weight_loader", None)
        if own_loader is not None:
            own_loader(param, loaded_weight, shard_index)
            return
        if shard_index is None:
            default_weight_loader(param, loaded_weight)
            return
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:
            raise ValueError(
                f"{self.prefix}: this parameter has no output_dim, so it cannot be loaded by shard"
            )
        offset = sum(self.output_sizes[:shard_index])
        size = self.output_sizes[shard_index]
        if getattr(param, "packed_dim", None) == output_dim:
            offset //= param.pack_factor
            size //= param.pack_factor
        default_weight_loader(param.data.narrow(output_dim, offset, size), loaded_weight)

    def load_fused(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        """Load a checkpoint tensor that holds every shard already concatenated (Phi-3 stores
        ``qkv_proj`` and ``gate_up_proj`` so), cut along ``output_dim`` and loaded shard by
        shard, so each format's per-shard handling applies. A parameter not split along the output
        features (a scale, an index) gets the whole tensor for every shard."""
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:
            for shard in range(self.num_shards):
                self.weight_loader(param, loaded_weight, shard)
            return
        sizes = list(self.output_sizes)
        if getattr(param, "packed_dim", None) == output_dim:
            sizes = [size // param.pack_factor for size in sizes]
        if loaded_weight.dim() <= output_dim or loaded_weight.shape[output_dim] != sum(sizes):
            raise ValueError(
                f"{self.prefix}: a fused checkpoint tensor of shape {tuple(loaded_weight.shape)} does "
                f"not hold the shards {sizes} along dimension {output_dim}"
            )
        for shard, piece in enumerate(loaded_weight.split(sizes, dim=output_dim)):
            self.weight_loader(param, piece, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        if self.lora_adapter is not None:
            mapping = get_lora_mapping()
            if mapping is not None:
                out = self.lora_adapter(x, out, mapping)
        return out

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_sizes}, bias={self.bias is not None}, "
            f"method={type(self.quant_method).__name__}"
        )
