"""FP8 (float8 e4m3) weights: vLLM's ``fp8`` checkpoints, and ``quantization="fp8"`` on an
unquantized checkpoint (each weight quantized per output channel while loading).

vLLM's format (``quant_method: "fp8"``): ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale``
float32 with one value per tensor, and with ``activation_scheme: "static"`` an ``input_scale``
per tensor; ``W = weight * weight_scale``. The compressed-tensors format (llm-compressor) uses the
same tensors and this module's method too (``compressed_tensors.py``).

On GPUs with FP8 tensor cores (compute capability 8.9 and up) activations are quantized per
token (or with the static ``input_scale``) and multiplied by ``torch._scaled_mm``; elsewhere the
weight is dequantized to the activation dtype and multiplied densely.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.core.layers.quantization import (
    LinearMethod,
    QuantizationConfig,
    UnquantizedLinearMethod,
    set_weight_attrs,
)
from pagedserve.plugins.quant.int_linear import triton_available

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def quantize_fp8(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> (float8 weight, float32 scale ``[N, 1]`` or ``[1]``) with
    ``scale = max|w| / 448`` over each row (or the whole tensor)."""
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # all-zero rows stay 0
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def load_per_shard_scale(param: torch.Tensor, loaded: torch.Tensor, shard_index: int | None) -> None:
    """A per-tensor scale: one value per shard of a merged layer (``param`` has one per shard)."""
    if loaded.numel() != 1:
        raise ValueError(f"expected a per-tensor scale (one value), got shape {tuple(loaded.shape)}")
    param.data[shard_index or 0] = loaded.reshape(()).to(param.dtype)


@functools.cache
def _has_fp8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _scaled_mm(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x [M, K]`` quantized per token (or with the static input scale) times the FP8 weight,
    with row-wise scales on both sides, in bfloat16 (what row-wise ``_scaled_mm`` produces)."""
    if layer.input_scale is not None:
        x_scale = layer.input_scale.expand(x.shape[0], 1).contiguous()
        scaled = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX)
    elif triton_available():
        from pagedserve.plugins.quant.triton_fp8 import per_token_scale

        scaled, x_scale = per_token_scale(x)
    else:
        x_scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        scaled = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX)
    return torch._scaled_mm(
        scaled.to(FP8_DTYPE),
        layer.weight.t(),
        scale_a=x_scale,
        scale_b=layer.weight_scale.view(1, -1),
        out_dtype=torch.bfloat16,
    )


class Fp8LinearMethod(LinearMethod):
    """Holds, once loaded, ``weight`` float8 ``[N, K]``, ``weight_scale`` float32 ``[N]`` (per-tensor
    scales are spread over their shard's rows) and ``input_scale`` (a float32 scalar or None).
    Under tensor parallelism the weight splits like a dense one and the scales go whole to every
    rank (a per-channel scale follows the output features of a column layer)."""

    supports_tensor_parallel = True

    def __init__(self, serialized: bool, per_channel: bool = False, static_input: bool = False) -> None:
        self.serialized = serialized
        self.per_channel = per_channel
        self.static_input = static_input

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        out, shards = sum(output_sizes), len(output_sizes)
        weight_dtype = FP8_DTYPE if self.serialized else params_dtype
        params: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {
            "weight": (torch.empty(out, input_size, dtype=weight_dtype), {"input_dim": 1, "output_dim": 0})
        }
        if self.serialized:
            per_shard = {"weight_loader": load_per_shard_scale}
            params["weight_scale"] = (
                (torch.empty(out, 1, dtype=torch.float32), {"output_dim": 0})
                if self.per_channel
                else (torch.empty(shards, dtype=torch.float32), per_shard)
            )
            if self.static_input:
                params["input_scale"] = (torch.empty(shards, dtype=torch.float32), per_shard)
        for name, (tensor, attrs) in params.items():
            param = nn.Parameter(tensor, requires_grad=False)
            set_weight_attrs(param, attrs)
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.serialized:
            weight, scale = quantize_fp8(layer.weight.data, per_channel=True)
        elif self.per_channel:
            weight, scale = layer.weight.data, layer.weight_scale.data
        else:
            sizes = torch.tensor(layer.output_sizes, device=layer.weight.device)
            weight, scale = layer.weight.data, layer.weight_scale.data.repeat_interleave(sizes)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.reshape(-1).contiguous(), requires_grad=False)
        # Static activation scales of merged shards: the largest one covers them all.
        input_scale = layer.input_scale.data.max().reshape(1, 1) if self.static_input else None
        if self.static_input:
            del layer.input_scale
        layer.register_buffer("input_scale", input_scale, persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = layer.weight.shape
        if x.is_cuda and _has_fp8_tensor_cores(x.device.index or 0) and n % 16 == 0 and k % 16 == 0:
            flat = x.reshape(-1, k)
            out = _scaled_mm(flat, layer).to(x.dtype).reshape(*x.shape[:-1], n)
            return out if bias is None else out + bias
        weight = layer.weight.to(x.dtype) * layer.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, weight, bias)


class Fp8Config(QuantizationConfig):
    """vLLM's ``fp8`` format, or (with ``{}``, when forced onto an unquantized checkpoint)
    quantization at load time."""

    name = "fp8"

    def __init__(self, serialized: bool, static_input: bool, ignored_layers: list[str]) -> None:
        self.serialized = serialized
        self.static_input = static_input
        self.ignored_layers = ignored_layers

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> Fp8Config:
        if not hf_quant_config:
            return cls(serialized=False, static_input=False, ignored_layers=[])
        if hf_quant_config.get("weight_block_size"):
            raise ValueError(
                "FP8 checkpoints with block-wise scales (weight_block_size) are not supported; "
                "pagedserve reads per-tensor and per-channel scales"
            )
        scheme = hf_quant_config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"FP8 activation_scheme {scheme!r} is not supported (dynamic, static)")
        ignored = list(hf_quant_config.get("ignored_layers") or [])
        return cls(serialized=True, static_input=scheme == "static", ignored_layers=ignored)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        if any(name in prefix for name in self.ignored_layers):
            return UnquantizedLinearMethod()
        return Fp8LinearMethod(self.serialized, per_channel=False, static_input=self.static_input)
