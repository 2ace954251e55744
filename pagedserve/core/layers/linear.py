"""The linear layer model code uses: its weights and matmul belong to the chosen quant method,
its share of the work under tensor parallelism to its parallel role.

Roles (Megatron's, as vLLM names them): ``"replicated"`` (every rank holds the whole layer),
``"column"`` (the output features are split over the ranks; the input is whole) and ``"row"``
(the input features are split, each rank multiplies its part and the outputs are summed over the
ranks). A column layer followed by a row layer (qkv -> o, gate_up -> down) needs one all-reduce.
Model code names the role; the layer reads the rank from ``pagedserve.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pagedserve.core.forward_context import get_lora_mapping
from pagedserve.distributed import parallel_state
from pagedserve.distributed.shards import CheckpointTensor, materialize, shard_of, units_per_rank
from pagedserve.core.layers.quantization import (
    QuantizationConfig,
    UnquantizedLinearMethod,
    set_weight_attrs,
)


PARALLEL_ROLES = ("replicated", "column", "row")


def default_weight_loader(param: torch.Tensor, loaded_weight: CheckpointTensor) -> None:
    """Copy a checkpoint tensor into a parameter of the same shape (casting its dtype)."""
    loaded_weight = materialize(loaded_weight)
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit a parameter of "
            f"shape {tuple(param.shape)}"
        )
    param.data.copy_(loaded_weight)


class Linear(nn.Module):
    """``y = x @ W.T + b``; with several ``output_sizes`` it is a merged layer (qkv, gate_up)
    whose output is the concatenation of its shards, each loaded from its own HF weight.

    ``parallel`` is the layer's role under tensor parallelism (see the module docstring). A column
    layer's ``output_units`` says, per merged shard, how many indivisible units (attention heads)
    it is made of; by default every feature is one. ``input_size`` and ``output_sizes`` are
    this rank's part; ``full_input_size`` and ``full_output_sizes`` the checkpoint's.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: int | list[int],
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        params_dtype: torch.dtype | None = None,
        parallel: str = "replicated",
        output_units: list[int] | None = None,
    ) -> None:
        super().__init__()
        if parallel not in PARALLEL_ROLES:
            raise ValueError(f"{prefix}: parallel must be one of {', '.join(PARALLEL_ROLES)}, got {parallel!r}")
        self.prefix = prefix
        self.parallel = parallel
        self.tp_rank = parallel_state.get_tp_rank()
        self.tp_size = parallel_state.get_tp_world_size() if parallel != "replicated" else 1
        self.full_input_size = input_size
        self.full_output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.output_units = list(output_units) if output_units is not None else list(self.full_output_sizes)
        if len(self.output_units) != len(self.full_output_sizes):
            raise ValueError(f"{prefix}: output_units needs one entry per output shard")
        self.input_size, self.output_sizes = self._partition()
        self.output_size = sum(self.output_sizes)
        params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_method = (
            quant_config.get_linear_method(self, prefix)
            if quant_config is not None
            else UnquantizedLinearMethod()
        )
        if self.tp_size > 1 and not self.quant_method.supports_tensor_parallel:
            raise ValueError(
                f"{prefix}: the weight format {type(self.quant_method).__name__} cannot be split "
                f"for tensor parallelism; use tensor_parallel_size=1 or another format"
            )
        self.quant_method.create_weights(self, self.input_size, self.output_sizes, params_dtype)
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.output_size, dtype=params_dtype), requires_grad=False
            )
            # A row layer's bias is added once, after the sum over ranks: it is not split.
            set_weight_attrs(self.bias, {"output_dim": 0} if parallel != "row" else {})
        else:
            self.register_parameter("bias", None)
        #: The LoRA slot: a callable ``(x, base_output, lora_mapping) -> output`` set by the LoRA
        #: manager, called only in steps whose forward context holds a mapping.
        self.lora_adapter: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None

    def _partition(self) -> tuple[int, list[int]]:
        """This rank's input size and output sizes; ValueError naming what does not divide."""
        world = self.tp_size
        if world == 1:
            return self.full_input_size, list(self.full_output_sizes)
        if self.parallel == "row":
            if self.full_input_size % world:
                raise ValueError(
                    f"{self.prefix}: {self.full_input_size} input features do not divide over "
                    f"tensor_parallel_size={world}"
                )
            return self.full_input_size // world, list(self.full_output_sizes)
        sizes = []
        for size, units in zip(self.full_output_sizes, self.output_units):
            try:
                sizes.append(size // units * units_per_rank(units, world))
            except ValueError:
                what = "features" if units == size else "heads"
                raise ValueError(
                    f"{self.prefix}: {units} output {what} do not divide over "
                    f"tensor_parallel_size={world} (nor does {world} divide by {units})"
                ) from None
        return self.full_input_size, sizes

    def rank_part(self, param: torch.Tensor, loaded: CheckpointTensor, shard_index: int | None) -> torch.Tensor:
        """This rank's part of a checkpoint tensor for ``param`` (read from the file only now).

        Column layers cut along the parameter's ``output_dim`` (in units of the shard's heads), row
        layers along its ``input_dim``; a parameter without that axis (a per-tensor scale, GPTQ's
        ``g_idx`` in a column layer), or whose checkpoint extent along it already equals this
        rank's (one quantization group spanning every input feature), is whole on every rank."""
        if self.tp_size == 1:
            return materialize(loaded)
        if self.parallel == "column":
            dim = getattr(param, "output_dim", None)
            if dim is None:
                return materialize(loaded)
            units = self.output_units[shard_index or 0]
            if getattr(param, "packed_dim", None) == dim:  # a word packs several features
                units = math.gcd(units, loaded.shape[dim])
            try:
                start, length = shard_of(loaded.shape[dim], units, self.tp_rank, self.tp_size)
            except ValueError as exc:
                raise ValueError(f"{self.prefix}: output shard {shard_index or 0}: {exc}") from None
            return materialize(loaded.narrow(dim, start, length))
        dim = getattr(param, "input_dim", None)
        if dim is None:
            return materialize(loaded)
        extent, local = loaded.shape[dim], param.shape[dim]
        if extent == local:
            return materialize(loaded)
        if extent != local * self.tp_size:
            raise ValueError(
                f"{self.prefix}: a checkpoint tensor with {extent} rows along the input features does "
                f"not split into {self.tp_size} parts of {local}"
            )
        return materialize(loaded.narrow(dim, self.tp_rank * local, local))

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: CheckpointTensor, shard_index: int | None = None
    ) -> None:
        """Load a whole parameter, or shard ``shard_index`` of a merged one along ``output_dim``;
        a parameter with its own ``weight_loader`` attribute loads itself. Either way only this
        rank's part of the checkpoint tensor is read (``rank_part``)."""
        if shard_index is not None and not 0 <= shard_index < self.num_shards:
            raise ValueError(f"{self.prefix}: shard {shard_index} of {self.num_shards} does not exist")
        loaded_weight = self.rank_part(param, loaded_weight, shard_index)
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

    def load_fused(self, param: torch.Tensor, loaded_weight: CheckpointTensor) -> None:
        """Load a checkpoint tensor that holds every shard already concatenated (Phi-3 stores
        ``qkv_proj`` and ``gate_up_proj`` so), cut along ``output_dim`` and loaded shard by
        shard, so each format's per-shard handling applies. A parameter not split along the output
        features (a scale, an index) gets the whole tensor for every shard."""
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:
            for shard in range(self.num_shards):
                self.weight_loader(param, loaded_weight, shard)
            return
        sizes = list(self.full_output_sizes)
        if getattr(param, "packed_dim", None) == output_dim:
            sizes = [size // param.pack_factor for size in sizes]
        if loaded_weight.dim() <= output_dim or loaded_weight.shape[output_dim] != sum(sizes):
            raise ValueError(
                f"{self.prefix}: a fused checkpoint tensor of shape {tuple(loaded_weight.shape)} does "
                f"not hold the shards {sizes} along dimension {output_dim}"
            )
        offset = 0
        for shard, size in enumerate(sizes):
            self.weight_loader(param, loaded_weight.narrow(output_dim, offset, size), shard)
            offset += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel == "row" and self.tp_size > 1:
            out = parallel_state.all_reduce(self.quant_method.apply(self, x, None))
            return out if self.bias is None else out + self.bias
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
            + (f", parallel={self.parallel}" if self.parallel != "replicated" else "")
        )
