"""``quantization="int8"`` for a mixture-of-experts layer's experts: each expert's gate/up and
down matrices quantized per output channel at load time as ``int8.py`` quantizes a linear layer.

On the CPU each expert is multiplied in int8 by ``torch._weight_int8pack_mm`` over its own rows
(``plugins/moe/cpu_experts.py``): a decode step then streams a quarter of float32's expert bytes.
Elsewhere the experts are dequantized to the model dtype at each call and run as unquantized
experts (memory saved, no speed-up).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.plugins.moe import cpu_experts
from pagedserve.plugins.moe.layer import FusedMoE, MoEMethod, stacked_experts
from pagedserve.plugins.quant.int8 import cpu_activation_dtype, quantize_int8


def quantize_experts(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weights`` [E, N, K] -> (int8 [E, N, K], float32 scales [E, N]), a scale per expert row."""
    e, n, k = weights.shape
    q, scale = quantize_int8(weights.reshape(e * n, k))
    return q.view(e, n, k), scale.view(e, n)


class Int8MoEMethod(MoEMethod):
    """Loads the dense experts, then holds ``w13_weight``/``w2_weight`` in int8 with
    ``w13_scale``/``w2_scale`` per expert row (in the CPU kernel's activation dtype there)."""

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        model_dtype = layer.w13_weight.dtype
        on_cpu = layer.w13_weight.device.type == "cpu"
        scale_dtype = cpu_activation_dtype(model_dtype) if on_cpu else model_dtype
        for name in ("w13", "w2"):
            q, scale = quantize_experts(getattr(layer, f"{name}_weight").data)
            setattr(layer, f"{name}_weight", nn.Parameter(q, requires_grad=False))
            setattr(layer, f"{name}_scale", nn.Parameter(scale.to(scale_dtype), requires_grad=False))
        if on_cpu:
            layer.cpu_weights = (
                list(layer.w13_weight.data.unbind(0)),
                list(layer.w2_weight.data.unbind(0)),
                list(layer.w13_scale.data.unbind(0)),
                list(layer.w2_scale.data.unbind(0)),
            )

    def apply(self, layer: FusedMoE, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if layer.cpu_weights is not None:
            return cpu_experts.moe_cpu_experts(hidden, weights, ids, *layer.cpu_weights, layer.activation_name)
        w13 = layer.w13_weight.to(hidden.dtype) * layer.w13_scale.to(hidden.dtype).unsqueeze(-1)
        w2 = layer.w2_weight.to(hidden.dtype) * layer.w2_scale.to(hidden.dtype).unsqueeze(-1)
        return stacked_experts(layer, hidden, w13, w2, weights, ids)
