"""Triton kernel for the dynamic per-token activation scaling of the FP8 path.

In eager mode the torch version (abs, amax, divide, clamp) is several launches per linear layer,
which at decode batch sizes costs more than the FP8 GEMM saves; this is one. It writes the
scaled activations in float32 and lets torch round them to float8: Triton's interpreter rounds
float8 casts wrongly when the mantissa carries into the exponent, so an in-kernel cast could not
be checked on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


@triton.jit
def _per_token_scale_kernel(
    x_ptr, out_ptr, scale_ptr, K, stride_x, FP8_LIMIT: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FP8_LIMIT, 1e-12)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        scaled = tl.clamp(x / scale, -FP8_LIMIT, FP8_LIMIT)
        tl.store(out_ptr + row * K + k0 + offs, scaled, mask=k0 + offs < K)


def per_token_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (``x / scale`` in float32, clamped to the float8 range; ``scale`` float32
    ``[M, 1]``) with ``scale = max(|x_row|) / 448``."""
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    scaled = torch.empty(M, K, dtype=torch.float32, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    block = min(1024, triton.next_power_of_2(K))
    _per_token_scale_kernel[(M,)](x, scaled, scale, K, x.stride(0), FP8_LIMIT=FP8_MAX, BLOCK=block)
    return scaled, scale
