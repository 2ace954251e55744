"""Split-KV (flash-decoding): how many splits a launch uses, and the kernel that merges them.

A decode step at small batch gives the attention kernel few programs (one per query block and
KV head): Llama-3-8B at batch 1 is 8 programs on a GPU with 132 SMs. Splitting each sequence's
keys into ``num_splits`` contiguous ranges, attended by separate programs that write a partial
(unnormalised) output with its running max and sum, fills the GPU; the reduction kernel then
merges the partials, exactly (the log-sum-exp rescaling of the online softmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Programs worth launching per SM: enough resident programs to hide memory latency.
PROGRAMS_PER_SM = 4
#: A split attends at least this many keys, so its fixed cost (the query load, the partial
#: write, its share of the reduction) stays small against the keys it streams.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32


def choose_num_splits(num_programs: int, max_seq_len: int, num_sms: int | None) -> int:
    """The number of KV splits for a launch of ``num_programs`` (query block, KV head) programs.

    The heuristic: no split when the launch already has ``PROGRAMS_PER_SM`` programs per SM (or
    the device is not a GPU, ``num_sms`` None); otherwise as many splits as bring it there, but
    no more than the longest sequence gives ``MIN_KEYS_PER_SPLIT`` keys each, and at most
    ``MAX_SPLITS``. So batch 1 at 32k context splits 32 ways, batch 256 never splits, and short
    contexts never split (nothing to gain, the reduction would cost more).
    """
    if num_sms is None or num_programs <= 0:
        return 1
    target = PROGRAMS_PER_SM * num_sms
    if num_programs >= target:
        return 1
    by_occupancy = triton.cdiv(target, num_programs)
    by_length = max_seq_len // MIN_KEYS_PER_SPLIT
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


@triton.jit
def _reduce_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    stride_o_t,
    stride_o_h,
    num_heads,
    num_splits,
    BLOCK_S: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < num_splits
    row = (token * num_heads + head) * num_splits + splits  # [BLOCK_S] into [T, H, S]
    # Maxima are in log2 units (the attention kernel scales scores by log2(e)); an empty
    # split has max -inf and sum 0, and gets weight 0.
    maxima = tl.load(part_max_ptr + row, mask=split_ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row, mask=split_ok, other=0.0)
    top = tl.max(maxima, 0)
    weights = tl.where(split_ok, tl.exp2(maxima - top), 0.0)
    total = tl.sum(sums * weights, 0)
    acc = tl.load(
        part_acc_ptr + row[:, None] * HEAD_SIZE + dims[None, :],
        mask=split_ok[:, None] & (dims < HEAD_SIZE)[None, :],
        other=0.0,
    )
    out = tl.sum(acc * weights[:, None], 0) / total
    tl.store(
        out_ptr + token * stride_o_t + head * stride_o_h + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_SIZE,
    )


def reduce_splits(out: torch.Tensor, part_acc: torch.Tensor, part_max: torch.Tensor, part_sum: torch.Tensor) -> None:
    """Merge ``part_acc`` [T, H, S, D] (unnormalised), ``part_max`` and ``part_sum`` [T, H, S]
    (float32) into ``out`` [T, H, D]."""
    num_tokens, num_heads, num_splits, head_size = part_acc.shape
    if num_tokens == 0:
        return
    _reduce_splits_kernel[(num_tokens, num_heads)](
        out,
        part_acc,
        part_max,
        part_sum,
        out.stride(0),
        out.stride(1),
        num_heads,
        num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        HEAD_SIZE=head_size,
        BLOCK_D=triton.next_power_of_2(head_size),
        num_warps=1 if head_size * num_splits <= 1024 else 4,
    )
