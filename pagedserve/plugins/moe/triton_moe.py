"""The fused MoE kernel: the (token, expert) pairs sorted by expert, then one grouped GEMM launch
per projection instead of a launch (and a gather) per expert.

``align_by_expert`` lays the pairs out in blocks of ``BLOCK_M`` rows, each block holding pairs of
one expert only (an expert's last block padded with the invalid id ``T * k``), all with torch ops
on the device and no host sync. A program of ``_grouped_gemm`` takes one block and ``BLOCK_N``
output columns: it loads its rows of the input (the token's hidden state for the first
projection, the pair's own row for the second), that expert's weight tile, accumulates in float32
and writes each row back to its pair's slot, times the routing weight for the down projection.
The ``k`` pairs of a token are summed at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 32


def _interpreting() -> bool:
    from pagedserve.plugins.attention.triton.backend import interpreting

    return interpreting()


@triton.jit
def _grouped_gemm(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr,
    num_pairs, N, K,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm,
    ROWS_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    if tl.max(row_ok.to(tl.int32), 0) == 0:  # a padding block past the last expert's pairs
        return
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    a_rows = (pairs // ROWS_PER_TOKEN).to(tl.int64)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(
            b_ptr + expert * stride_be + cols[None, :] * stride_bn + ks[:, None] * stride_bk,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter computes bf16 wrongly: work in float32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)[:, None]
    dst = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(dst, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` [T, k] -> (sorted pair ids [num_blocks * block_m], padded with ``T * k``; each
    block's expert [num_blocks]). ``num_blocks`` is the bound ``cdiv(T * k, block_m) + E``, so the
    grid does not depend on the routing (no host sync)."""
    flat = ids.flatten()
    num_pairs = flat.numel()
    num_blocks = triton.cdiv(num_pairs, block_m) + num_experts
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    first_slot = padded_end - padded  # where each expert's rows start
    first_pair = torch.cumsum(counts, 0) - counts  # where each expert's pairs start in `order`
    experts_sorted = flat[order]
    rank = torch.arange(num_pairs, device=ids.device) - first_pair[experts_sorted]
    sorted_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int64, device=ids.device)
    sorted_ids[first_slot[experts_sorted] + rank] = order
    block_starts = torch.arange(num_blocks, device=ids.device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_experts


def _launch(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor, sorted_ids: torch.Tensor,
    block_experts: torch.Tensor, rows_per_token: int, mul_weight: bool,
) -> None:  # fmt: skip
    num_pairs, n = c.shape
    k = a.shape[1]
    grid = (block_experts.numel(), triton.cdiv(n, BLOCK_N))
    _grouped_gemm[grid](
        a, b, c, weights, sorted_ids, block_experts,
        num_pairs, n, k,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
        ROWS_PER_TOKEN=rows_per_token, MUL_WEIGHT=mul_weight,
        UPCAST=a.dtype == torch.bfloat16 and _interpreting(),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
    )  # fmt: skip


def fused_experts(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts: ``hidden`` [T, H], ``w13`` [E, 2I, H], ``w2`` [E, H, I], routing
    ``weights`` float32 [T, k] and ``ids`` [T, k] -> [T, H] (same as ``grouped_experts``)."""
    num_tokens, top_k = ids.shape
    hidden = hidden.contiguous()
    intermediate = w2.shape[2]
    sorted_ids, block_experts = align_by_expert(ids, w13.shape[0])
    pair_weights = weights.flatten().float().contiguous()
    gate_up = torch.empty(num_tokens * top_k, 2 * intermediate, dtype=hidden.dtype, device=hidden.device)
    _launch(hidden, w13, gate_up, pair_weights, sorted_ids, block_experts, top_k, mul_weight=False)
    gate, up = gate_up.split(intermediate, dim=-1)
    activated = (F.silu(gate) * up).contiguous()
    down = torch.empty(num_tokens * top_k, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    _launch(activated, w2, down, pair_weights, sorted_ids, block_experts, 1, mul_weight=True)
    return down.view(num_tokens, top_k, -1).sum(1).to(hidden.dtype)
