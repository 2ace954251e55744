"""KV store: write each scheduled token's new K/V into the paged cache at its slot.

One program per token copies its ``[num_kv_heads, head_size]`` rows of K and V to
``slot // block_size, slot % block_size`` of the caches. With an fp8 cache the values are divided
by the layer's per-tensor scale and saturated to the fp8 range before the cast (the attention
kernel multiplies them back).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    kv_scale_ptr,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_kc_b,
    stride_kc_t,
    stride_kc_h,
    stride_vc_b,
    stride_vc_t,
    stride_vc_h,
    num_kv_heads,
    HEAD_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_LIMIT: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # a negative slot marks a padding token: nothing to store
        block = slot // PAGE
        offset = slot % PAGE
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_SIZE)[None, :]
        src = token.to(tl.int64)
        key = tl.load(key_ptr + src * stride_k_t + heads[:, None] * stride_k_h + dims[None, :], mask=mask)
        value = tl.load(value_ptr + src * stride_v_t + heads[:, None] * stride_v_h + dims[None, :], mask=mask)
        if KV_FP8:
            key = tl.clamp(key.to(tl.float32) / tl.load(kv_scale_ptr), -FP8_LIMIT, FP8_LIMIT)
            value = tl.clamp(value.to(tl.float32) / tl.load(kv_scale_ptr + 1), -FP8_LIMIT, FP8_LIMIT)
        k_dst = key_cache_ptr + block * stride_kc_b + offset * stride_kc_t
        v_dst = value_cache_ptr + block * stride_vc_b + offset * stride_vc_t
        key = key.to(key_cache_ptr.dtype.element_ty)
        value = value.to(value_cache_ptr.dtype.element_ty)
        tl.store(k_dst + heads[:, None] * stride_kc_h + dims[None, :], key, mask=mask)
        tl.store(v_dst + heads[:, None] * stride_vc_h + dims[None, :], value, mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Write ``key``/``value`` ([T, Hkv, D]) into the caches ([num_blocks, block_size, Hkv, D]).

    ``kv_scale`` (float32 [2]: the K and V scales) is required when the caches are fp8.
    """
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    fp8 = key_cache.dtype == FP8_DTYPE
    if fp8 and kv_scale is None:
        raise ValueError("an fp8 KV cache needs kv_scale (the per-tensor K and V scales)")
    for name, tensor in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        kv_scale if fp8 else key_cache,  # an unused pointer when not fp8
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        num_kv_heads,
        HEAD_SIZE=head_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_size),
        PAGE=key_cache.shape[1],
        KV_FP8=fp8,
        FP8_LIMIT=FP8_MAX,
        num_warps=4 if num_kv_heads * head_size >= 1024 else 1,
    )
