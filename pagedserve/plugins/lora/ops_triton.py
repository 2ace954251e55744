"""Triton shrink and expand for batched LoRA, in Punica's BGMV shape: every token reads its own
slot's A and B from the stacked buffers (``token_slots``, -1 = no adapter, skipped at once), so
one launch serves every adapter of the step.

shrink: ``y[t, :] = x[t, :] @ A[slot(t)].T`` (fp32 accumulation, fp32 ``y``)
expand: ``out[t, :] += y[t, :] @ B[slot(t)]`` (B stacked as [slots, R, out])

Inputs are upcast to fp32 right after each load (so the interpreter, which cannot do bf16
arithmetic, runs them too). The torch path (``ops_torch``) is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.plugins.lora.mapping import LoRAMapping


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, y_ptr, slots_ptr,
    in_features, rank,
    stride_xt, stride_as, stride_ar, stride_yt,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token)
    if slot < 0:
        return
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token * stride_xt + k, mask=k < in_features, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + slot * stride_as + r[:, None] * stride_ar + k[None, :],
            mask=(r[:, None] < rank) & (k[None, :] < in_features),
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(y_ptr + token * stride_yt + r, acc, mask=r < rank)


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, out_ptr, slots_ptr,
    out_features, rank,
    stride_yt, stride_bs, stride_br, stride_ot,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token)
    if slot < 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        y = tl.load(y_ptr + token * stride_yt + r, mask=r < rank, other=0.0)
        b = tl.load(
            b_ptr + slot * stride_bs + r[None, :] * stride_br + n[:, None],
            mask=(n[:, None] < out_features) & (r[None, :] < rank),
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(b * y[None, :], axis=1)
    mask = n < out_features
    out = tl.load(out_ptr + token * stride_ot + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + n, (out + acc).to(out_ptr.dtype.element_ty), mask=mask)


def shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """[T, in] x [S, R, in] -> fp32 [T, R] (rows of tokens without a slot are left zero)."""
    num_tokens, in_features = x.shape
    rank = lora_a.shape[1]
    x = x.contiguous()
    y = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    block_r = min(triton.next_power_of_2(rank), 64)
    block_k = min(triton.next_power_of_2(in_features), 128)
    grid = (num_tokens, triton.cdiv(rank, block_r))
    _shrink_kernel[grid](
        x, lora_a, y, token_slots, in_features, rank,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), y.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip
    return y


def expand(out: torch.Tensor, y: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """``out [T, N] += y [T, R] x [S, R, N]`` in place, for the tokens with a slot."""
    num_tokens, out_features = out.shape
    rank = lora_b.shape[1]
    assert out.stride(1) == 1 and lora_b.stride(2) == 1
    block_n = min(triton.next_power_of_2(out_features), 128)
    block_r = min(triton.next_power_of_2(rank), 64)
    grid = (num_tokens, triton.cdiv(out_features, block_n))
    _expand_kernel[grid](
        y, lora_b, out, token_slots, out_features, rank,
        y.stride(0), lora_b.stride(0), lora_b.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    mapping: LoRAMapping,
    slots_in_use: list[bool],
) -> torch.Tensor:
    """The Triton counterpart of ``ops_torch.add_lora`` (same contract)."""
    if not any(slots_in_use[slot] for slot, _ in mapping.groups):
        return out
    y = shrink(x, lora_a, mapping.token_slots)
    return expand(out, y, lora_b, mapping.token_slots)
