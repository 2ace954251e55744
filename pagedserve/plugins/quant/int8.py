"""``quantization="int8"``: int8 weight-only quantization of any unquantized checkpoint at load
time, like llama.cpp's Q8_0 (which scales blocks of 32 weights; this scales whole output
channels, what torch's int8 CPU kernel takes).

Each linear weight ``W [N, K]``, the LM head's included (as Q8_0 does), becomes
``q = round(W / s)`` in int8 with ``s = max|W[n]| / 127`` per output channel, a quarter of
float32's bytes: at small batches a CPU decode step streams every weight once, so it goes about as
fast as the weights are small. The matmul is ``torch._weight_int8pack_mm`` (ATen's CPU kernel: the
int8 weight is converted to the activation dtype tile by tile, never written out whole).
Activations go in as bfloat16 where the CPU has bfloat16 dot products (avx512_bf16, where ATen
runs the kernel through oneDNN; its float32 variant measured 5-17x slower than the bfloat16 one
there), else in the model's dtype. Fast at small batches only: at 64 rows the kernel is slower
than a dense float32 matmul. Elsewhere (CUDA) the weight is dequantized per call.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.core.layers.quantization import LinearMethod, QuantizationConfig, set_weight_attrs

INT8_MAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> (int8 ``[N, K]``, float32 scales ``[N]``), symmetric per output channel."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


@functools.cache
def cpu_activation_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (the fast path of ATen's int8 kernel), else
    the model's dtype."""
    if torch.cpu.get_capabilities().get("avx512_bf16", False):
        return torch.bfloat16
    return model_dtype


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x [..., K] @ (weight [N, K] * scale [N, None]).T + bias`` in ``x``'s dtype."""
    n, k = weight.shape
    if x.device.type == "cpu":
        flat = x.reshape(-1, k).to(scale.dtype).contiguous()
        out = torch._weight_int8pack_mm(flat, weight, scale).to(x.dtype).reshape(*x.shape[:-1], n)
        return out if bias is None else out + bias
    return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


class Int8LinearMethod(LinearMethod):
    """Loads the checkpoint's dense weight, then holds ``weight`` int8 ``[N, K]`` and
    ``weight_scale`` ``[N]`` in the matmul's activation dtype."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        model_dtype = layer.weight.dtype
        weight, scale = quantize_int8(layer.weight.data)
        if weight.device.type == "cpu":
            compute_dtype = cpu_activation_dtype(model_dtype)
        else:
            compute_dtype = model_dtype
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.to(compute_dtype), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_matmul(x, layer.weight, layer.weight_scale, bias)


class Int8LMHeadMethod(Int8LinearMethod):
    """The LM head: its dense ``weight`` stays (a tied embedding reads it); the int8 copy and
    its scales are added beside it as ``qweight`` and ``weight_scale``."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        raise NotImplementedError("the LM head creates its own dense weight")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        qweight, scale = quantize_int8(layer.weight.data)
        dtype = cpu_activation_dtype(layer.weight.dtype) if qweight.device.type == "cpu" else layer.weight.dtype
        layer.register_buffer("qweight", qweight, persistent=False)
        layer.register_buffer("weight_scale", scale.to(dtype), persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_matmul(x, layer.qweight, layer.weight_scale, bias)


class Int8Config(QuantizationConfig):
    """Quantization at load time only: there is no int8 checkpoint format to read."""

    name = "int8"

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> Int8Config:
        if hf_quant_config:
            raise ValueError(
                "quantization='int8' quantizes an unquantized checkpoint while loading; this "
                f"checkpoint is already quantized ({hf_quant_config.get('quant_method')!r})"
            )
        return cls()

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        return Int8LinearMethod()

    def get_lm_head_method(self, layer: nn.Module) -> LinearMethod:
        return Int8LMHeadMethod()

    def get_moe_method(self, layer: nn.Module, prefix: str) -> Any:
        from pagedserve.plugins.quant.int8_moe import Int8MoEMethod

        return Int8MoEMethod()
