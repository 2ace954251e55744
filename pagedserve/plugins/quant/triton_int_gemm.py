"""Triton kernels for the packed integer layout of ``int_linear`` (AWQ and GPTQ, 4 and 8 bits).

* ``fused_matmul``: W4A16/W8A16 GEMM that unpacks, dequantizes and multiplies a tile of weights
  in registers, never writing the dense weight. For the few rows of a decode step, reading 4-bit
  instead of 16-bit weights is where the speed comes from; split-K spreads the reduction over more
  programs when the output alone has too few tiles to fill the GPU.
* ``dequantize``: the dense weight, for prefill-sized batches where one dense GEMM reuses each
  weight many times.

Both run under ``TRITON_INTERPRET=1`` on CPU tensors (the interpreter cannot do bfloat16
arithmetic: test in float32 and float16).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _fused_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr,
    M, N, K, stride_xm, group_size,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Preconditions (checked by the launcher): K and group_size are multiples of BLOCK_K, which is
    # a multiple of the values per word, so a K tile lies in one group and starts a word.
    per: tl.constexpr = 32 // BITS
    mask_bits: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kk = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_shift = (offs_kk % per) * BITS
    z_shift = (offs_n % per) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + offs_kk
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        word_ptrs = qw_ptr + (offs_k // per)[:, None] * N + offs_n[None, :]
        words = tl.load(word_ptrs, mask=mask_n[None, :], other=0)
        q = (words >> k_shift[:, None]) & mask_bits
        group = k0 // group_size
        zero_words = tl.load(qz_ptr + group * (N // per) + offs_n // per, mask=mask_n, other=0)
        zeros = (zero_words >> z_shift) & mask_bits
        scales = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = ((q - zeros[None, :]).to(tl.float32) * scales[None, :]).to(x.dtype)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(
    qw_ptr, qz_ptr, s_ptr, out_ptr, N, K, group_size,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    per: tl.constexpr = 32 // BITS
    mask_bits: tl.constexpr = (1 << BITS) - 1
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    words = tl.load(qw_ptr + (offs_k // per)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    q = (words >> ((offs_k % per) * BITS)[:, None]) & mask_bits
    group = offs_k // group_size
    zero_words = tl.load(qz_ptr + group[:, None] * (N // per) + (offs_n // per)[None, :], mask=mask, other=0)
    zeros = (zero_words >> ((offs_n % per) * BITS)[None, :]) & mask_bits
    scales = tl.load(s_ptr + group[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    w = (q - zeros).to(tl.float32) * scales
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _block_k(K: int, group_size: int, bits: int) -> int | None:
    """The largest K tile (at least 16, for ``tl.dot``) that never straddles a group."""
    for block in (128, 64, 32, 16):
        if group_size % block == 0 and K % block == 0 and block % (32 // bits) == 0:
            return block
    return None


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(tiles: int, K: int, block_k: int, device: torch.device) -> int:
    """Double the K split while the grid has fewer than two programs per SM and each program
    keeps at least two K tiles."""
    if device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index or 0)
    split = 1
    while tiles * split < target and K // (block_k * split * 2) >= 2:
        split *= 2
    return split


def fused_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N]`` straight from the packed layout; ``split_k`` overrides the heuristic."""
    M, K = x.shape
    N = scales.shape[1]
    block_k = _block_k(K, group_size, bits)
    if block_k is None:  # odd sizes: dequantize (the kernel masks every edge) and multiply
        return x @ dequantize(qweight, qzeros, scales, bits, group_size, x.dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64 if M <= 64 else 128
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split = split_k or _split_k(tiles, K, block_k, x.device)
    if split == 1:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split)
    _fused_kernel[grid](
        x, qweight, qzeros, scales, out, M, N, K, x.stride(0), group_size,
        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=3,
    )
    return out if split == 1 else out.sum(0).to(x.dtype)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense ``[K, N]`` weight in ``dtype``."""
    K = qweight.shape[0] * (32 // bits)
    N = scales.shape[1]
    out = torch.empty(K, N, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(K, 64), triton.cdiv(N, 64))
    _dequantize_kernel[grid](
        qweight, qzeros, scales, out, N, K, group_size, BITS=bits, BLOCK_K=64, BLOCK_N=64
    )
    return out
