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
there), else in the model's dtype. That kernel is a loop over rows (GEMV-shaped: its cost grows
with the rows, at 64 rows slower than a dense float32 matmul), so from ``INT8_GEMM_MIN_ROWS`` rows
on, where the CPU has int8 dot products (VNNI or AMX), the activations are quantized too, per row
(``quantize_rows``), and multiplied int8 by int8 (``torch._int_mm``, a GEMM whose cost hardly grows
with rows up to a few dozen), as llama.cpp's Q8_0 quantizes activations to 8 bits for its dot
products; and with as many rows as a prefill has, the weight is dequantized for one dense matmul
(``int8_cpu_kernel``). Elsewhere (CUDA) the weight is dequantized per call.
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


#: From this many rows a CPU int8 matmul quantizes its activations and runs int8 x int8
#: (``torch._int_mm``) instead of the weight-only kernel: the weight-only kernel's cost grows with
#: the rows, the GEMM's hardly until the weight's bytes stop bounding it (measured here, 4-8 rows).
INT8_GEMM_MIN_ROWS = 8


#: The CPU has int8 dot-product instructions (VNNI or AMX), which make ``torch._int_mm`` a fast
#: GEMM (a constant, so that ``torch.compile`` traces ``int8_cpu_kernel``'s choice).
CPU_HAS_INT8_DOT = any(
    torch.cpu.get_capabilities().get(name, False) for name in ("amx_int8", "avx512_vnni", "avx_vnni")
)


def int8_cpu_kernel(rows: int, weight: torch.Tensor) -> str:
    """How ``int8_cpu_matmul`` multiplies ``rows`` rows by ``weight [N, K]``:

    - ``"dequantize"`` when dequantizing the weight (``N * K`` elements) is less work than
      quantizing the rows and rescaling the outputs (``rows * (K + N)``), as in a prefill: the
      weight in the activations' dtype, a dense matmul (the weight-only result);
    - ``"int8_gemm"`` from ``INT8_GEMM_MIN_ROWS`` rows where the CPU has int8 dot products:
      the rows quantized per row, int8 x int8;
    - ``"weight_only"`` otherwise: ``torch._weight_int8pack_mm``."""
    n, k = weight.shape
    if rows * (n + k) >= n * k:
        return "dequantize"
    if rows >= INT8_GEMM_MIN_ROWS and CPU_HAS_INT8_DOT:
        return "int8_gemm"
    return "weight_only"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``x [M, K]`` -> (int8 ``[M, K]``, float32 scales ``[M, 1]``), symmetric per row."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny) / INT8_MAX
    return torch.round(x / scale).to(torch.int8), scale


def int8_cpu_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x [M, K] @ (weight [N, K] * scale [N, None]).T`` on the CPU in ``scale``'s dtype, ``x``
    contiguous in that dtype, by ``int8_cpu_kernel``'s choice; the int8 GEMM takes ``quantized``
    (``quantize_rows(x)``) when given: a caller with several matmuls on the same rows quantizes
    them once."""
    kernel = int8_cpu_kernel(x.shape[0], weight)
    if kernel == "dequantize":
        return F.linear(x, weight.to(x.dtype) * scale[:, None])
    if kernel == "weight_only":
        return torch._weight_int8pack_mm(x, weight, scale)
    q, row_scale = quantize_rows(x) if quantized is None else quantized
    return int8_gemm(q, row_scale, weight, scale)


def int8_gemm(q: torch.Tensor, row_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q [M, K]`` int8 rows (``row_scale [M, 1]``) by ``weight [N, K]`` int8 (``scale [N]``):
    ``torch._int_mm``'s int32 product rescaled -> ``[M, N]`` in ``scale``'s dtype.

    Under ``torch.compile`` this is the opaque op ``pagedserve::int8_gemm`` (whose
    implementation is this function, run eagerly), so that its output is a tensor: inductor
    would otherwise inline the rescale (pointwise on the product) into the consumers, and one
    that reduces over another axis recomputes it per element: in the compiled decode step the
    traced attention dequantized and roped the query again for every key position (at batch 64,
    context 128, 7.8 ms a layer against 0.9 ms for eager SDPA and its gather)."""
    if torch.compiler.is_compiling():
        return _int8_gemm_op(q, row_scale, weight, scale)
    return (torch._int_mm(q, weight.t()) * row_scale).mul_(scale).to(scale.dtype)


_int8_gemm_op = torch.library.custom_op("pagedserve::int8_gemm", int8_gemm, mutates_args=())


@_int8_gemm_op.register_fake
def _(q: torch.Tensor, row_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.new_empty((q.shape[0], weight.shape[0]), dtype=scale.dtype)


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x [..., K] @ (weight [N, K] * scale [N, None]).T + bias`` in ``x``'s dtype."""
    n, k = weight.shape
    if x.device.type == "cpu":
        flat = x.reshape(-1, k).to(scale.dtype).contiguous()
        out = int8_cpu_matmul(flat, weight, scale).to(x.dtype).reshape(*x.shape[:-1], n)
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
