"""Integer weights packed into int32 words, and AWQ's interleaved nibble order.

A word holds ``32 // bits`` values; value ``i`` of a word sits at bits ``[i * bits, (i + 1) * bits)``.
GPTQ packs sequentially (value ``i`` of word ``w`` is element ``w * per + i`` along the packed axis).
AutoAWQ's GEMM layout packs the output features of 4-bit weights in the interleaved order
``AWQ_PACK_ORDER``: nibble ``i`` of a word holds column ``AWQ_PACK_ORDER[i]`` of its eight, so a
word whose eight columns hold 0..7 reads ``0x75316420``.
"""

from __future__ import annotations

import torch

#: Nibble ``i`` of an AWQ word holds column ``AWQ_PACK_ORDER[i]`` of the word's eight columns.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Column ``j`` of an AWQ word is nibble ``AWQ_UNPACK_ORDER[j]`` (the inverse permutation).
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def values_per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"{bits}-bit values do not pack evenly into int32 words")
    return 32 // bits


def _shifts(bits: int, ndim: int, axis: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The bit offsets of a word's values, shaped to broadcast along ``axis`` of ``ndim`` axes."""
    shape = [1] * ndim
    shape[axis] = 32 // bits
    return torch.arange(0, 32, bits, dtype=dtype, device=device).view(shape)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned integers below ``2**bits`` along ``dim`` (whose size must be a multiple of
    ``32 // bits``) into int32 words, sequentially."""
    per = values_per_word(bits)
    dim %= values.dim()
    if values.shape[dim] % per:
        raise ValueError(f"cannot pack {values.shape[dim]} values into words of {per}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values to pack must lie in [0, {(1 << bits) - 1}]")
    shape = list(values.shape)
    shape[dim : dim + 1] = [shape[dim] // per, per]
    grouped = values.to(torch.int64).reshape(shape)
    words = (grouped << _shifts(bits, len(shape), dim + 1, values.device, torch.int64)).sum(dim + 1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement int32
    return words.to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of ``pack_int32``: int32 values in ``[0, 2**bits)``, ``dim`` grown by
    ``32 // bits``."""
    per = values_per_word(bits)
    dim %= words.dim()
    spread = words.to(torch.int32).unsqueeze(dim + 1)
    values = (spread >> _shifts(bits, spread.dim(), dim + 1, words.device, torch.int32)) & ((1 << bits) - 1)
    shape = list(words.shape)
    shape[dim] *= per
    return values.reshape(shape)


def _permute_within_words(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    cols = values.shape[-1]
    if cols % len(order):
        raise ValueError(f"{cols} columns do not split into words of {len(order)}")
    index = (torch.arange(cols, device=values.device).view(-1, len(order))[:, list(order)]).reshape(-1)
    return values.index_select(-1, index)


def awq_to_sequential(values: torch.Tensor) -> torch.Tensor:
    """Columns unpacked sequentially from AWQ words -> the columns in their true order."""
    return _permute_within_words(values, AWQ_UNPACK_ORDER)


def sequential_to_awq(values: torch.Tensor) -> torch.Tensor:
    """Columns in their true order -> the order whose sequential packing is AWQ's layout."""
    return _permute_within_words(values, AWQ_PACK_ORDER)
