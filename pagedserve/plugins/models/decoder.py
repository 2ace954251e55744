"""The decoder-only transformer every built-in family is, built from core layers.

Llama, Mistral, Qwen2/3, Phi-3, Gemma 2, Mixtral and Qwen3-MoE differ in a handful of choices
(biases, q/k norms, where the norms sit, the embedding scale, soft-capping, per-layer windows,
a dense or a sparse MLP, how the checkpoint names its weights). A family states those choices as a
``DecoderOptions`` read from its HF config; this module builds the model from them, so no family
copies a layer to change one line of it. Model code here never names a weight format or a kernel:
``Linear`` asks the quant method, ``Attention`` the backend, ``FusedMoE`` its experts method.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pagedserve.core.layers.activation import get_act_fn
from pagedserve.core.layers.attention import Attention
from pagedserve.core.layers.embedding import LMHead, VocabEmbedding
from pagedserve.core.layers.linear import Linear
from pagedserve.core.layers.norm import RMSNorm
from pagedserve.core.layers.quantization import QuantizationConfig
from pagedserve.core.layers.rotary import (
    RotaryEmbedding,
    get_rope,
    rope_parameters_from_config,
    rotary_dim_from_config,
)
from pagedserve.distributed import parallel_state
from pagedserve.plugins.models.checkpoint import load_checkpoint
from pagedserve.plugins.moe import FusedMoE


def head_dim_of(hf_config: Any) -> int:
    explicit = getattr(hf_config, "head_dim", None)
    return explicit or hf_config.hidden_size // hf_config.num_attention_heads


@dataclass(frozen=True)
class MoEOptions:
    """A sparse MLP: a router picks ``top_k`` of ``num_experts`` experts per token."""

    num_experts: int
    top_k: int
    intermediate_size: int
    #: Renormalise the chosen experts' probabilities to sum to 1 (Mixtral always; Qwen3-MoE by
    #: ``norm_topk_prob``).
    renormalize: bool
    #: Layer indices with a sparse MLP; the others keep a dense one of ``intermediate_size``.
    sparse_layers: frozenset[int]


@dataclass(frozen=True)
class DecoderOptions:
    """How one family's decoder differs from Llama's (the defaults are Llama's)."""

    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    #: Qwen3: an RMSNorm over each head of q and of k, before the rotary embedding.
    qk_norm: bool = False
    #: Gemma: norms compute ``(1 + w) * x / rms(x)``.
    norm_weight_offset: float = 0.0
    #: Gemma: embeddings times ``sqrt(hidden_size)``.
    embedding_scale: float | None = None
    #: Gemma 2: norms after attention and after the MLP too (four per layer).
    sandwich_norms: bool = False
    #: Scores' scale; None = ``head_dim ** -0.5`` (Gemma: ``query_pre_attn_scalar ** -0.5``).
    attention_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    #: Each layer's sliding window (None = full attention); empty = full everywhere.
    sliding_windows: tuple[int | None, ...] = ()
    moe: MoEOptions | None = None
    #: HF weight-name parts renamed to ours before loading (``(".block_sparse_moe.", ".mlp.")``).
    weight_renames: tuple[tuple[str, str], ...] = ()
    #: The checkpoint's per-expert projection names -> (our expert parameter, shard).
    expert_weights: dict[str, tuple[str, int | None]] = field(
        default_factory=lambda: {
            "gate_proj": ("w13", 0),
            "up_proj": ("w13", 1),
            "down_proj": ("w2", None),
        }
    )


def sliding_windows_from_config(hf_config: Any, uniform: int | None) -> tuple[int | None, ...]:
    """Per-layer windows: from ``layer_types`` when the config has them (Gemma 2 interleaves,
    Qwen2 windows the layers from ``max_window_layers`` on), else ``uniform`` on every layer."""
    num_layers = hf_config.num_hidden_layers
    layer_types = getattr(hf_config, "layer_types", None)
    window = getattr(hf_config, "sliding_window", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return (uniform,) * num_layers


class DecoderAttention(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        options: DecoderOptions,
        rotary_emb: RotaryEmbedding,
        quant_config: QuantizationConfig | None,
        layer_index: int,
        prefix: str,
    ) -> None:
        super().__init__()
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim = head_dim_of(hf_config)
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.qkv_proj = Linear(
            hf_config.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            bias=options.qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
            parallel="column",
            output_units=[num_heads, num_kv_heads, num_kv_heads],
        )
        self.o_proj = Linear(
            self.q_size,
            hf_config.hidden_size,
            bias=options.o_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
            parallel="row",
        )
        if options.qk_norm:
            self.q_norm = RMSNorm(head_dim, hf_config.rms_norm_eps, options.norm_weight_offset)
            self.k_norm = RMSNorm(head_dim, hf_config.rms_norm_eps, options.norm_weight_offset)
        self.qk_norm = options.qk_norm
        self.rotary_emb = rotary_emb
        windows = options.sliding_windows
        self.attn = Attention(
            num_heads,
            head_dim,
            options.attention_scale or head_dim**-0.5,
            num_kv_heads,
            sliding_window=windows[layer_index] if windows else None,
            layer_index=layer_index,
            logits_soft_cap=options.attn_logit_softcap,
        )

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden_states: torch.Tensor) -> torch.Tensor:
        """``rope``: the step's ``RotaryEmbedding.cos_sin``, computed once for every layer."""
        qkv = self.qkv_proj(hidden_states)
        q_size, kv_size, _ = self.qkv_proj.output_sizes
        if self.qk_norm:
            q, k, v = qkv.split(self.qkv_proj.output_sizes, dim=-1)
            q = self.rotary_emb.rotate(self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape), rope)
            k = self.rotary_emb.rotate(self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape), rope)
        else:  # q and k are adjacent in qkv: rotated together, in one set of ops
            qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
            q, k = self.rotary_emb.rotate(qk, rope).split([q_size, kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v))


class DenseMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up as one merged layer (SwiGLU, GeGLU)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        options: DecoderOptions,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            hidden_size,
            [intermediate_size, intermediate_size],
            bias=options.mlp_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
            parallel="column",
        )
        self.down_proj = Linear(
            intermediate_size,
            hidden_size,
            bias=options.mlp_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
            parallel="row",
        )
        self.act_fn = get_act_fn(options.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.gate_up_proj.output_sizes, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class SparseMoEMLP(nn.Module):
    """A router (``gate``, kept dense as checkpoints keep it) and the experts as one fused layer."""

    def __init__(
        self,
        hidden_size: int,
        moe: MoEOptions,
        options: DecoderOptions,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        if parallel_state.get_tp_world_size() > 1:
            raise ValueError(
                f"{prefix}: mixture-of-experts layers are not split for tensor parallelism yet; "
                "serve this model with tensor_parallel_size=1"
            )
        self.gate = Linear(hidden_size, moe.num_experts, bias=False, prefix=f"{prefix}.gate")
        self.experts = FusedMoE(
            moe.num_experts,
            moe.top_k,
            hidden_size,
            moe.intermediate_size,
            activation=options.hidden_act,
            renormalize=moe.renormalize,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        options: DecoderOptions,
        rotary_emb: RotaryEmbedding,
        quant_config: QuantizationConfig | None,
        layer_index: int,
        prefix: str,
    ) -> None:
        super().__init__()
        hidden, eps, offset = hf_config.hidden_size, hf_config.rms_norm_eps, options.norm_weight_offset
        self.sandwich_norms = options.sandwich_norms
        self.input_layernorm = RMSNorm(hidden, eps, offset)
        self.self_attn = DecoderAttention(
            hf_config, options, rotary_emb, quant_config, layer_index, f"{prefix}.self_attn"
        )
        # Llama's post_attention_layernorm is the norm before the MLP; Gemma 2's follows the
        # attention and pre_feedforward_layernorm comes before the MLP.
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset)
        if options.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset)
        moe = options.moe
        if moe is not None and layer_index in moe.sparse_layers:
            self.mlp: nn.Module = SparseMoEMLP(hidden, moe, options, quant_config, f"{prefix}.mlp")
        else:
            self.mlp = DenseMLP(
                hidden, hf_config.intermediate_size, options, quant_config, f"{prefix}.mlp"
            )

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(this layer's output, the residual stream before it)``: the next norm adds them."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(rope, hidden_states)
        if self.sandwich_norms:
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DecoderModel(nn.Module):
    def __init__(
        self, hf_config: Any, options: DecoderOptions, quant_config: QuantizationConfig | None
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(
            hf_config.vocab_size, hf_config.hidden_size, scale=options.embedding_scale
        )
        head_dim = head_dim_of(hf_config)
        rope_theta, rope_scaling = rope_parameters_from_config(hf_config)
        # One cos/sin cache shared by every layer (it can be large for long contexts).
        rotary_emb = get_rope(
            head_dim,
            rotary_dim_from_config(hf_config, head_dim),
            hf_config.max_position_embeddings,
            rope_theta,
            rope_scaling,
        )
        self.rotary_emb = rotary_emb
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, options, rotary_emb, quant_config, i, f"model.layers.{i}")
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, options.norm_weight_offset)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        rope = self.rotary_emb.cos_sin(positions, hidden_states.dtype)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(rope, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class DecoderForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> hidden [T, hidden]`` over a flat batch, run
    inside ``set_forward_context``; ``compute_logits`` -> fp32 [T, vocab].

    A family subclasses it and overrides ``decoder_options``; nothing else.
    """

    def __init__(self, hf_config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = hf_config
        self.quant_config = quant_config
        self.options = self.decoder_options(hf_config)
        self.model = DecoderModel(hf_config, self.options, quant_config)
        tied = self.model.embed_tokens if getattr(hf_config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(
            hf_config.vocab_size,
            hf_config.hidden_size,
            tied_to=tied,
            soft_cap=self.options.final_logit_softcap,
            quant_config=quant_config,
        )

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """This family's choices, read from its config (every family implements it)."""
        raise NotImplementedError(f"{cls.__name__} must implement decoder_options")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (see ``checkpoint.load_checkpoint``)."""
        load_checkpoint(self, weights, self.options.weight_renames, self.options.expert_weights)
