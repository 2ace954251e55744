"""Unified varlen paged attention: prefills, prefix hits, prompt chunks and decodes in one launch.

Grid ``(query blocks, KV heads, KV splits)``. A program takes ``BLOCK_Q`` consecutive new tokens
of one request and all ``GROUP`` query heads that share one KV head (GQA/MQA): its ``BLOCK_M =
BLOCK_Q * GROUP`` query rows go through ``tl.dot`` together, so each key tile is read once for
the whole group. It walks the request's keys in tiles of ``TILE_N`` tokens, looking up each
token's block in the block table (so tiles need not align with pages), with an online softmax
in float32. Queries sit at absolute positions ``context_len + i``, so the causal mask and the
sliding window (keys ``p - window + 1 .. p``) are position comparisons, and tiles outside the
window are never loaded. Soft-capped scores (``c * tanh(s / c)``, Gemma 2) are capped per tile
before the online softmax.

Requests are found without host work: request ``r``'s query blocks are numbered from
``query_start_loc[r] // BLOCK_Q + r``, which a program inverts by binary search, so the grid
``num_tokens // BLOCK_Q + num_reqs`` covers every request (programs past a request's last token
return at once).

With ``SPLIT_KV`` (see ``split_kv``) each program attends one contiguous share of the key tiles
and writes an unnormalised partial output with its running max and sum. The number of splits is
a runtime argument, so the many values the heuristic picks share one compiled kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.plugins.attention.triton.backend import interpreting
from pagedserve.plugins.attention.triton.kv_store import FP8_DTYPE

LOG2E = 1.4426950408889634


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q: tl.constexpr):
    """The request whose query blocks include ``q_block`` (the last ``r`` with
    ``query_start_loc[r] // BLOCK_Q + r <= q_block``)."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr, query_ptr, key_cache_ptr, value_cache_ptr, kv_scale_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    scale_log2, soft_cap_log2, num_reqs, num_heads, sliding_window, num_splits,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h, stride_bt,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, PAGE: tl.constexpr,
    SPLIT_KV: tl.constexpr, USE_WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, KV_FP8: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    query_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    first = (q_block - (q_start // BLOCK_Q + req)) * BLOCK_Q  # this program's first new token
    if first >= query_len:
        return
    context_len = tl.load(seq_lens_ptr + req) - query_len

    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP  # index among the request's new tokens
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (token < query_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_SIZE
    flat_token = (q_start + token).to(tl.int64)
    q = tl.load(
        query_ptr + flat_token[:, None] * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter computes bf16 wrongly: work in float32 there
        q = q.to(tl.float32)
    q_pos = context_len + token  # absolute positions of the query rows

    # Keys this program can see: up to its last query, from its first query's window start.
    kv_end = context_len + tl.minimum(first + BLOCK_Q, query_len)
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(context_len + first - sliding_window + 1, 0)
    tile_begin = kv_begin // TILE_N
    tile_end = tl.cdiv(kv_end, TILE_N)
    if SPLIT_KV:
        per_split = tl.cdiv(tile_end - tile_begin, num_splits)
        tile_begin = tile_begin + split * per_split
        tile_end = tl.minimum(tile_end, tile_begin + per_split)
    if KV_FP8:
        k_scale = tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    for tile in range(tile_begin, tile_end):
        keys = tile * TILE_N + tl.arange(0, TILE_N)
        key_ok = keys < kv_end
        block = tl.load(table + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
        k_off = block * stride_kc_b + (keys % PAGE) * stride_kc_t + kv_head * stride_kc_h
        v_off = block * stride_vc_b + (keys % PAGE) * stride_vc_t + kv_head * stride_vc_h
        k = tl.load(key_cache_ptr + k_off[None, :] + dims[:, None], mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
        v = tl.load(value_cache_ptr + v_off[:, None] + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        if KV_FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        elif UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, TILE_N], log2 units
        if SOFT_CAP:  # c * tanh(s / c) in log2 units (soft_cap_log2 = c * log2 e); tanh from exp
            s = soft_cap_log2 * (1.0 - 2.0 / (tl.exp(s * (2.0 / soft_cap_log2)) + 1.0))
        visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (keys[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = row_ok[:, None] & dim_ok[None, :]
    if not SPLIT_KV:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        dst = out_ptr + flat_token[:, None] * stride_o_t + head[:, None] * stride_o_h + dims[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (flat_token * num_heads + head) * num_splits + split  # [T, H, S] row
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_SIZE + dims[None, :], acc, mask=out_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch (chosen from the batch shape, no autotuning: see docs)."""

    block_q: int
    block_m: int
    tile_n: int
    num_warps: int
    num_stages: int


def launch_config(group: int, head_size: int, max_query_len: int, dtype: torch.dtype) -> LaunchConfig:
    """16 query rows for decode-like batches (a GQA group of one token fills them) with a
    3-stage pipeline (memory bound: keep loads in flight); 64 rows when some request brings many
    new tokens, with 8 warps from head size 128 up and 64-key tiles up to head size 128. float32
    (IEEE dots, no tensor cores) takes half of that: 32 rows and 16-key tiles. Chosen so that
    every launch compiles without register spills and within 99 KiB of shared memory on sm_80
    and sm_90 (tests/test_triton_compile.py); not yet tuned on a GPU."""
    block_d = triton.next_power_of_2(max(head_size, 16))
    decode = max_query_len * group <= 16
    if dtype == torch.float32:
        block_m, tile_n = (16 if decode else 32), 16
        num_warps = 4 if decode else 8
    else:
        block_m = 16 if decode else 64
        tile_n = 64 if not decode and block_d <= 128 else 32
        num_warps = 8 if block_m * block_d >= 64 * 128 else 4
    block_m = max(block_m, triton.next_power_of_2(group))
    return LaunchConfig(block_m // group, block_m, tile_n, num_warps, num_stages=3 if decode else 2)


def paged_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    kv_scale: torch.Tensor | None = None,
    num_splits: int = 1,
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    soft_cap: float | None = None,
) -> LaunchConfig:
    """Attend ``query`` [T, H, D] over the caches [num_blocks, block_size, Hkv, D] into ``out``.

    With ``num_splits > 1``, ``partials`` are float32 ``(acc [T, H, S, D], max [T, H, S],
    sum [T, H, S])`` that receive the per-split results; the caller then runs
    ``split_kv.reduce_splits``. ``soft_cap`` c caps the scaled scores to ``c * tanh(s / c)``.
    Returns the launch configuration used.
    """
    num_tokens, num_heads, head_size = query.shape
    num_reqs = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    config = launch_config(group, head_size, max_query_len, query.dtype)
    if num_tokens == 0:
        return config
    fp8 = key_cache.dtype == FP8_DTYPE
    if fp8 and kv_scale is None:
        raise ValueError("an fp8 KV cache needs kv_scale (the per-tensor K and V scales)")
    if num_splits > 1 and partials is None:
        raise ValueError("num_splits > 1 needs the partial buffers")
    for name, tensor in (("query", query), ("out", out), ("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")
    part_acc, part_max, part_sum = partials if num_splits > 1 else (out, out, out)
    grid = (num_tokens // config.block_q + num_reqs, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        out, query, key_cache, value_cache, kv_scale if fp8 else key_cache,
        block_tables, query_start_loc, seq_lens,
        part_acc, part_max, part_sum,
        scale * LOG2E, (soft_cap or 1.0) * LOG2E, num_reqs, num_heads, sliding_window or 0, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_tables.stride(0),
        HEAD_SIZE=head_size,
        BLOCK_D=triton.next_power_of_2(max(head_size, 16)),
        GROUP=group,
        BLOCK_Q=config.block_q,
        BLOCK_M=config.block_m,
        TILE_N=config.tile_n,
        PAGE=key_cache.shape[1],
        SPLIT_KV=num_splits > 1,
        USE_WINDOW=sliding_window is not None,
        SOFT_CAP=soft_cap is not None,
        KV_FP8=fp8,
        UPCAST=query.dtype == torch.bfloat16 and interpreting(),
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    return config
