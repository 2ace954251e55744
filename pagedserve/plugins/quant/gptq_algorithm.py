"""GPTQ (Frantar et al., 2022) for one weight matrix: Hessian-aware rounding with act-order.

For a linear layer ``y = x @ W.T`` and calibration inputs ``X``, GPTQ quantizes ``W`` one input
column at a time and spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse of ``H = 2 X.T X``, so the layer's output on ``X`` moves as little as
possible. Act-order (``desc_act``) quantizes the columns with the largest ``H`` diagonal (the most
active inputs) first. Group parameters (min/max of the group's current, error-updated weights)
are found when a group's first column comes up, in quantization order; ``g_idx`` records each
column's group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Columns updated together before their accumulated error is pushed to the rest (lazy batch).
BLOCK_SIZE = 128


@dataclass
class GPTQResult:
    """Integers ``values [N, K]`` in ``[0, 2**bits)`` and per-group ``zeros``/``scales [G, N]``;
    ``W[n, k] ~ (values[n, k] - zeros[g_idx[k], n]) * scales[g_idx[k], n]``."""

    values: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        groups = self.g_idx.long()
        return (self.values - self.zeros[groups].T).float() * self.scales[groups].T


def group_params(
    w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` covering ``w [N, cols]``'s range (which always includes 0).

    Symmetric: the zero is the middle code ``2**(bits-1)``. Asymmetric: the zero is the code of 0;
    ``min_zero`` raises it (stretching the scale so the row's maximum still fits), for the classic
    checkpoint format, which stores ``zero - 1`` and so cannot hold a zero of 0.
    """
    maxq = (1 << bits) - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2, dtype=torch.long)
    zero = torch.round(-xmin / scale).long()
    low = zero < min_zero
    scale = torch.where(low, xmax / (maxq - min_zero), scale)
    return scale, torch.where(low, min_zero, zero)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1).long()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    act_order: bool,
    sym: bool,
    damp: float = 0.01,
    min_zero: int = 0,
    scale_dtype: torch.dtype = torch.float16,
) -> GPTQResult:
    """Quantize ``weight [N, K]`` given ``hessian [K, K]`` (``2 X.T X / n`` over calibration
    inputs); ``group_size`` -1 is one group of all ``K`` columns. ``damp`` (a fraction of the mean
    diagonal) is added to the diagonal so the Cholesky factorization is stable. Scales are rounded
    to ``scale_dtype`` (the checkpoint's) before use, so every rounding decision and error update
    sees the weights the checkpoint will actually hold."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    K = W.shape[1]
    group = K if group_size == -1 else group_size
    dead = H.diagonal() == 0  # inputs never active: no information, quantize them as 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    # The upper Cholesky factor of H^-1: row i holds the update coefficients of column i.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    values = torch.zeros_like(W, dtype=torch.long)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    block = group * max(1, BLOCK_SIZE // group) if group < K else BLOCK_SIZE
    if group == K:
        scale, zero = group_params(W, bits, sym, min_zero)
        scale = scale.to(scale_dtype).float()
        scales.append(scale)
        zeros.append(zero)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if group < K and (i1 + i) % group == 0:
                scale, zero = group_params(W1[:, i : i + group], bits, sym, min_zero)
                scale = scale.to(scale_dtype).float()
                scales.append(scale)
                zeros.append(zero)
            q = quantize_column(W1[:, i], scale, zero, bits)
            values[:, i1 + i] = q
            error = (W1[:, i] - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= error[:, None] * Hinv1[i, i:][None, :]
            errors[:, i] = error
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]

    inverse = torch.argsort(perm)
    return GPTQResult(
        values=values[:, inverse],
        zeros=torch.stack(zeros),
        scales=torch.stack(scales),
        g_idx=(inverse // group).to(torch.int32),
    )
