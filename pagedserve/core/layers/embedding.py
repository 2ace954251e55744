"""Token embedding and the LM head (which may share the embedding's weight), both split by
vocabulary under tensor parallelism.

Each rank holds ``ceil(vocab / ranks)`` consecutive rows (the last rank's tail is zero padding,
as vLLM pads the vocabulary). The embedding looks up the ids in its rows, zeroes the others and
sums over the ranks; the LM head scores the hidden states against its rows and gathers the ranks'
logits in vocabulary order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.core.layers import cpu_gemm
from pagedserve.core.layers.linear import default_weight_loader
from pagedserve.core.layers.quantization import LinearMethod, QuantizationConfig
from pagedserve.distributed import parallel_state
from pagedserve.distributed.shards import CheckpointTensor, materialize


class VocabShard:
    """This rank's rows ``[start, start + rows)`` of a vocabulary of ``vocab_size``; the first
    ``real_rows`` of them exist in the checkpoint."""

    def __init__(self, vocab_size: int) -> None:
        self.world_size = parallel_state.get_tp_world_size()
        self.rows = -(-vocab_size // self.world_size)
        self.start = parallel_state.get_tp_rank() * self.rows
        self.real_rows = max(0, min(vocab_size - self.start, self.rows))

    def load(self, param: torch.Tensor, loaded_weight: CheckpointTensor) -> None:
        if self.world_size == 1:
            default_weight_loader(param, loaded_weight)
            return
        if loaded_weight.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit a vocabulary "
                f"shard of shape {tuple(param.shape)}"
            )
        param.data.zero_()
        part = materialize(loaded_weight.narrow(0, self.start, self.real_rows))
        param.data[: self.real_rows].copy_(part)


class VocabEmbedding(nn.Module):
    """Token ids [T] -> embeddings [T, hidden], times ``scale`` when set (Gemma: sqrt(hidden),
    rounded to the weight dtype first, as HF does)."""

    def __init__(self, vocab_size: int, hidden_size: int, scale: float | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.shard = VocabShard(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.shard.rows, hidden_size), requires_grad=False)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.world_size == 1:
            embeddings = F.embedding(input_ids, self.weight)
        else:
            local = input_ids - self.shard.start
            outside = (local < 0) | (local >= self.shard.rows)
            embeddings = F.embedding(local.masked_fill(outside, 0), self.weight)
            embeddings = parallel_state.all_reduce(embeddings.masked_fill(outside[:, None], 0))
        if self.scale is not None:
            embeddings = embeddings * torch.tensor(self.scale, dtype=embeddings.dtype)
        return embeddings

    def weight_loader(self, param: torch.Tensor, loaded_weight: CheckpointTensor) -> None:
        self.shard.load(param, loaded_weight)


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
        self.hidden_size = hidden_size
        self.soft_cap = soft_cap
        self.tied = tied_to is not None
        self.shard = VocabShard(vocab_size)
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(self.shard.rows, hidden_size), requires_grad=False)
        self.quant_method: LinearMethod | None = (
            quant_config.get_lm_head_method(self) if quant_config is not None else None
        )
        cpu_gemm.no_packed_weight(self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            logits = self.quant_method.apply(self, hidden_states, None)
        else:
            logits = cpu_gemm.linear(hidden_states, self.weight, None, self)
        if self.shard.world_size > 1:
            logits = parallel_state.all_gather(logits, dim=-1)[..., : self.vocab_size]
        logits = logits.float()
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits

    def weight_loader(self, param: torch.Tensor, loaded_weight: CheckpointTensor) -> None:
        self.shard.load(param, loaded_weight)
