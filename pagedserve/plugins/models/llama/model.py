"""Llama over a flat (varlen) batch, built only from core layers.

Reads HF ``LlamaConfig`` keys: GQA (``num_key_value_heads``), an explicit ``head_dim``,
``attention_bias``/``mlp_bias``, ``tie_word_embeddings`` and RoPE scaling in either the
transformers 5 (``rope_parameters``) or the older (``rope_theta`` + ``rope_scaling``) layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from pagedserve.core.layers.attention import Attention
from pagedserve.core.layers.embedding import LMHead, VocabEmbedding
from pagedserve.core.layers.linear import Linear
from pagedserve.core.layers.norm import RMSNorm
from pagedserve.core.layers.quantization import QuantizationConfig
from pagedserve.core.layers.rotary import RotaryEmbedding, get_rope, rope_parameters_from_config

#: HF weight name part -> (our merged layer's name part, shard index).
MERGED_WEIGHTS: dict[str, tuple[str, int]] = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def head_dim_of(hf_config: Any) -> int:
    explicit = getattr(hf_config, "head_dim", None)
    return explicit or hf_config.hidden_size // hf_config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        rotary_emb: RotaryEmbedding,
        quant_config: QuantizationConfig | None,
        layer_index: int,
        sliding_window: int | None,
        prefix: str,
    ) -> None:
        super().__init__()
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        head_dim = head_dim_of(hf_config)
        bias = getattr(hf_config, "attention_bias", False)
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.qkv_proj = Linear(
            hf_config.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = Linear(
            self.q_size,
            hf_config.hidden_size,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            num_heads,
            head_dim,
            head_dim**-0.5,
            num_kv_heads,
            sliding_window=sliding_window,
            layer_index=layer_index,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, hf_config: Any, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        hidden, intermediate = hf_config.hidden_size, hf_config.intermediate_size
        bias = getattr(hf_config, "mlp_bias", False)
        self.intermediate_size = intermediate
        self.gate_up_proj = Linear(
            hidden,
            [intermediate, intermediate],
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = Linear(
            intermediate, hidden, bias=bias, quant_config=quant_config, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = ACT2FN[hf_config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        rotary_emb: RotaryEmbedding,
        quant_config: QuantizationConfig | None,
        layer_index: int,
        sliding_window: int | None,
        prefix: str,
    ) -> None:
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.self_attn = LlamaAttention(
            hf_config, rotary_emb, quant_config, layer_index, sliding_window, f"{prefix}.self_attn"
        )
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.mlp = LlamaMLP(hf_config, quant_config, f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(
        self, hf_config: Any, quant_config: QuantizationConfig | None, sliding_window: int | None
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        head_dim = head_dim_of(hf_config)
        rope_theta, rope_scaling = rope_parameters_from_config(hf_config)
        # One cos/sin cache shared by every layer (it can be large for long contexts).
        rotary_emb = get_rope(
            head_dim, head_dim, hf_config.max_position_embeddings, rope_theta, rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                hf_config, rotary_emb, quant_config, i, sliding_window, f"model.layers.{i}"
            )
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> hidden [T, hidden]`` over a flat batch, run
    inside ``set_forward_context``; ``compute_logits`` -> fp32 [T, vocab]."""

    def __init__(self, hf_config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = hf_config
        self.quant_config = quant_config
        self.model = LlamaModel(hf_config, quant_config, self.sliding_window(hf_config))
        tied = self.model.embed_tokens if getattr(hf_config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, tied_to=tied)

    @classmethod
    def sliding_window(cls, hf_config: Any) -> int | None:
        """Llama attends to the whole context."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; raises on a tensor this model has no place for, and on any
        parameter (or merged shard) the checkpoint did not provide."""
        params = dict(self.named_parameters())
        loaded: dict[str, set[int | None]] = {}
        for hf_name, tensor in weights:
            if "rotary_emb." in hf_name:
                continue
            if hf_name.startswith("lm_head.") and self.lm_head.tied:
                continue
            name, shard = hf_name, None
            for hf_part, (part, index) in MERGED_WEIGHTS.items():
                if hf_part in hf_name:
                    name, shard = hf_name.replace(hf_part, part), index
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(
                    f"the checkpoint has a weight {hf_name!r} that {type(self).__name__} does not "
                    f"expect (is the architecture or quantization setting right?)"
                )
            module = self.get_submodule(name.rpartition(".")[0])
            try:
                if shard is None:
                    module.weight_loader(param, tensor)
                else:
                    module.weight_loader(param, tensor, shard)
            except ValueError as exc:
                raise ValueError(f"cannot load {hf_name!r}: {exc}") from exc
            loaded.setdefault(name, set()).add(shard)

        missing = []
        for name in params:
            module = self.get_submodule(name.rpartition(".")[0])
            merged = isinstance(module, Linear) and module.num_shards > 1
            needed: set[int | None] = set(range(module.num_shards)) if merged else {None}
            if not needed <= loaded.get(name, set()):
                missing.append(name)
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} weight(s) of {type(self).__name__}: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
