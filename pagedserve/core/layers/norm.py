"""RMSNorm with an optional fused residual add, numerically as HF Llama (or Gemma) computes it."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.core.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, normalised in fp32 and cast back before the weight (as HF Llama).

    With ``weight_offset`` (Gemma: 1.0) the checkpoint stores ``w`` of ``(offset + w) * x / rms(x)``,
    and, as HF Gemma, the product is taken in fp32 and cast back after it.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.weight_offset = weight_offset

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``,
        the sum being the next residual stream (the add is done in the input dtype, as HF)."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        if dtype == torch.float32 and not self.weight_offset:
            # torch's own op: the same float32 arithmetic as below (bit-identical), in one call.
            out = torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
            return out if residual is None else (out, residual)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            out = (h * (self.weight_offset + self.weight.float())).to(dtype)
        else:
            out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        return f"{tuple(self.weight.shape)}, eps={self.eps}{offset}"
