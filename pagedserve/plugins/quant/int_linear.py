"""The layout AWQ and GPTQ weights share once loaded, and its matmul.

Both formats store b-bit integers ``q``, a zero point ``z`` and a scale ``s`` per group of
``group_size`` input features and output feature: ``W[k, n] = (q[k, n] - z[g, n]) * s[g, n]`` with
``g = k // group_size`` (GPTQ's act-order permutes which features share a group). They differ only
in how the integers are packed, so each format's method repacks its checkpoint tensors once, after
loading, into one layout, and a single kernel serves both:

* ``qweight`` int32 ``[K / per, N]``: input features packed sequentially, ``per = 32 // bits``;
* ``qzeros`` int32 ``[K / group_size, N / per]``: true zero points (no offset), output features
  packed sequentially;
* ``scales`` ``[K / group_size, N]`` in the model dtype;
* ``input_perm`` (act-order only) int64 ``[K]``: the input features sorted by group. ``W``'s rows
  are stored in this order, so ``apply`` gathers the matching columns of ``x``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

from pagedserve.core.layers.quantization import LinearMethod
from pagedserve.plugins.quant.packing import pack_int32, unpack_int32

#: Up to this many tokens the fused kernel multiplies straight from the packed weights; beyond it
#: dequantizing once and calling the dense GEMM is faster (the weights are reused by many rows).
FUSED_MAX_TOKENS = 256


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def dequantize_packed(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """The dense ``[K, N]`` weight of the shared layout, in ``scales``' dtype (the torch path)."""
    groups, n = scales.shape
    values = unpack_int32(qweight, bits, 0).view(groups, group_size, n)
    zeros = unpack_int32(qzeros, bits, 1)[:, None, :]
    return ((values - zeros).to(scales.dtype) * scales[:, None, :]).view(groups * group_size, n)


def packed_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N]`` for the shared layout: Triton on CUDA, dequantize-then-matmul in torch
    elsewhere (and on CUDA without Triton)."""
    if x.is_cuda and triton_available():
        from pagedserve.plugins.quant import triton_int_gemm

        if x.shape[0] <= FUSED_MAX_TOKENS:
            return triton_int_gemm.fused_matmul(x, qweight, qzeros, scales, bits, group_size)
        weight = triton_int_gemm.dequantize(qweight, qzeros, scales, bits, group_size, x.dtype)
        return x @ weight
    return x @ dequantize_packed(qweight, qzeros, scales, bits, group_size).to(x.dtype)


class PackedIntLinearMethod(LinearMethod):
    """The part of the AWQ and GPTQ methods that follows loading: ``set_packed_weights`` and
    ``apply``. Subclasses register the checkpoint's own tensors in ``create_weights``.

    Under tensor parallelism a column layer holds some output features of every group and a row
    layer whole groups of input features (a group spanning all input features is whole on every
    rank), so the layout is the same on each rank."""

    supports_tensor_parallel = True

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits = bits
        #: -1 (one group spanning all input features) is resolved per layer by ``group_size_for``.
        self.group_size = group_size

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    def group_size_for(self, layer: nn.Module, input_size: int) -> int:
        group = input_size if self.group_size == -1 else self.group_size
        if input_size % group:
            raise ValueError(
                f"{layer.prefix}: group size {group} does not divide its {input_size} input "
                f"features; this checkpoint does not fit the model"
            )
        return group

    def check_output_sizes(self, layer: nn.Module, output_sizes: list[int]) -> None:
        bad = [size for size in output_sizes if size % self.pack_factor]
        if bad:
            raise ValueError(
                f"{layer.prefix}: output sizes {bad} are not multiples of {self.pack_factor}, "
                f"which {self.bits}-bit packing needs"
            )

    def set_packed_weights(
        self,
        layer: nn.Module,
        values: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        input_perm: torch.Tensor | None,
    ) -> None:
        """Store integer ``values [K, N]`` (rows already in ``input_perm`` order), ``zeros [G, N]``
        and ``scales [G, N]`` in the shared layout, replacing the checkpoint's parameters."""
        layer.group_size = values.shape[0] // zeros.shape[0]
        layer.qweight = nn.Parameter(pack_int32(values, self.bits, 0), requires_grad=False)
        layer.qzeros = nn.Parameter(pack_int32(zeros, self.bits, 1), requires_grad=False)
        layer.scales = nn.Parameter(scales.contiguous(), requires_grad=False)
        layer.register_buffer("input_perm", input_perm, persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.input_perm is not None:
            x = x.index_select(-1, layer.input_perm)
        flat = x.reshape(-1, x.shape[-1])
        out = packed_matmul(flat, layer.qweight, layer.qzeros, layer.scales, self.bits, layer.group_size)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias
