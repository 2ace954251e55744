"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.core.layers.linear import default_weight_loader
from pagedserve.core.layers.quantization import LinearMethod, QuantizationConfig


class VocabEmbedding(nn.Module):
    """Token ids [T] -> embeddings [T, hidden], times ``scale`` when set (Gemma: sqrt(hidden),
    rounded to the weight dtype first, as HF does)."""

    def __init__(self, vocab_size: int, hidden_size: int, scale: float | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = F.embedding(input_ids, self.weight)
        if self.scale is not None:
            embeddings = embeddings * torch.tensor(self.scale, dtype=embeddings.dtype)
        return embeddings

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)


class LMHead(nn.Module):
    """Hidden states [T, hidden] -> fp32 logits [T, vocab].

    With ``tied_to`` the head reuses that embedding's parameter (``tie_word_embeddings``), so it
    owns no weight of its own and the checkpoint's ``lm_head.weight``, if any, is not needed.
    With ``soft_cap`` c the logits are ``c * tanh(logits / c)`` (Gemma 2's final soft-capping).
    A weight format that quantizes the head too (``QuantizationConfig.get_lm_head_method``) gets
    it as ``quant_method``; the dense ``weight`` stays, since a tied embedding reads it.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tied_to: VocabEmbedding | None = None,
        soft_cap: float | None = None,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.soft_cap = soft_cap
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.quant_method: LinearMethod | None = (
            quant_config.get_lm_head_method(self) if quant_config is not None else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            logits = self.quant_method.apply(self, hidden_states, None).float()
        else:
            logits = F.linear(hidden_states, self.weight).float()
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)
