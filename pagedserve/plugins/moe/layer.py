"""``FusedMoE``: every expert's gate/up and down projections as two stacked parameters.

``w13_weight`` [E, 2 * I, H] holds each expert's gate (rows ``:I``) and up (rows ``I:``)
projections, ``w2_weight`` [E, H, I] its down projection, loaded expert by expert from checkpoints
that store ``experts.<e>.gate_proj`` etc. (or ``w1``/``w3``/``w2``, Mixtral's names).

How it computes: on CUDA (with triton installed) the fused kernel of ``triton_moe`` (two grouped
GEMMs over the tokens sorted by expert, no per-expert launches); elsewhere ``grouped_experts``:
the (token, expert) pairs sorted by expert, two grouped matmuls (``torch.nn.functional.grouped_mm``)
over the stacked weights, the results put back in token order, weighted and summed per token.
On the CPU in bfloat16 (and with int8 experts) the weights are laid out once after loading for the
CPU's kernels instead (``cpu_experts``). A quantization format holds experts through its own
``MoEMethod`` (``QuantizationConfig.get_moe_method``); formats without one are refused.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.core.layers.activation import get_act_fn
from pagedserve.core.layers.linear import default_weight_loader
from pagedserve.core.layers.quantization import QuantizationConfig
from pagedserve.plugins.moe import cpu_experts


def route_top_k(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in float32, the ``top_k`` largest; returns (weights float32
    [T, k], expert ids int64 [T, k]), the weights renormalised to sum to 1 when asked."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _grouped_mm(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``rows[ends[e - 1]:ends[e]] @ weight[e].T`` for every expert ``e`` (``weight`` [E, N, K])."""
    if torch.compiler.is_compiling():
        return _grouped_mm_op(rows, weight, ends)
    return F.grouped_mm(rows, weight.transpose(1, 2), offs=ends)


# Opaque to torch.compile: the meta function of ``aten::_grouped_mm`` accepts only bfloat16 (the
# CUDA fast path's dtype), though the kernel takes float32 and float16 too. Eager calls skip it
# (a custom op costs about 15 us more a call on the CPU).
@torch.library.custom_op("pagedserve::moe_grouped_mm", mutates_args=())
def _grouped_mm_op(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(rows, weight.transpose(1, 2), offs=ends)


@_grouped_mm_op.register_fake
def _(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[1])


def grouped_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: Any,
) -> torch.Tensor:
    """The torch path: the (token, expert) pairs sorted by expert, then one grouped matmul per
    projection over the stacked expert weights (``F.grouped_mm``, each expert's rows against its
    own matrix, none for an expert without rows), and each token's ``k`` rows weighted and summed.

    No Python loop over experts and no host sync, so it traces into a graph; on the CPU the
    grouped matmul runs each group's matmul in C++ (the per-expert loop without Python's cost)."""
    num_tokens, top_k = ids.shape
    intermediate = w2.shape[2]
    experts, order = torch.sort(ids.flatten(), stable=True)
    # ends[e]: one past expert e's last row among the sorted pairs (the groups' offsets).
    ends = torch.searchsorted(
        experts, torch.arange(w13.shape[0], device=ids.device), right=True, out_int32=True
    )
    rows = hidden.index_select(0, order // top_k)
    gate, up = _grouped_mm(rows, w13, ends).split(intermediate, dim=-1)
    out = _grouped_mm(activation(gate) * up, w2, ends)
    # Back to (token, slot) order, weighted, and each token's k rows summed (a scatter and a sum:
    # index_add_ was the slowest op of the step on the CPU).
    unsorted = torch.empty_like(out).index_copy_(0, order, out)
    weighted = unsorted.view(num_tokens, top_k, -1) * weights.unsqueeze(-1)
    return weighted.sum(1).to(hidden.dtype)


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def stacked_experts(
    layer: FusedMoE, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The experts from stacked weights in the model dtype: the Triton kernel on CUDA (silu), else
    the grouped torch path."""
    if hidden.is_cuda and _triton_available() and layer.activation_name == "silu":
        from pagedserve.plugins.moe import triton_moe

        return triton_moe.fused_experts(hidden, w13, w2, weights, ids)
    return grouped_experts(hidden, w13, w2, weights, ids, layer.act_fn)


class MoEMethod:
    """How a ``FusedMoE`` stores its experts and computes them (the experts' ``LinearMethod``;
    a quantization format returns its own from ``QuantizationConfig.get_moe_method``).

    ``create_weights`` registers ``w13_weight`` [E, 2 * I, H] and ``w2_weight`` [E, H, I] in the
    checkpoint's dtype, which the layer's ``weight_loader`` fills expert by expert;
    ``process_weights_after_loading`` may then replace them by the kernel's layout."""

    def create_weights(self, layer: FusedMoE, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        e = layer.num_experts
        layer.w13_weight = nn.Parameter(torch.empty(e, 2 * intermediate_size, hidden_size, dtype=dtype), requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(e, hidden_size, intermediate_size, dtype=dtype), requires_grad=False)

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        """On the CPU where oneDNN's kernels pay (``cpu_experts.packs``: bfloat16 with bf16
        units; float32 where they win at a decode step's few rows an expert, timed): each
        expert's weights reordered once into oneDNN's layout, the stacked copies dropped, and
        small experts also packed all together for the decode step sizes where one matmul over
        every expert is faster (``cpu_experts.dense_experts_for``, timed). The rest, and CUDA,
        keep the grouped matmuls."""
        w13 = layer.w13_weight
        if w13.device.type != "cpu" or not cpu_experts.packs(w13.data, layer.w2_weight.data):
            return
        layer.cpu_weights = (cpu_experts.pack_onednn(w13.data), cpu_experts.pack_onednn(layer.w2_weight.data), [], [])
        layer.cpu_dense = cpu_experts.dense_experts_for(w13.data, layer.w2_weight.data, *layer.cpu_weights[:2],
                                                        layer.top_k, layer.activation_name)
        del layer.w13_weight, layer.w2_weight

    def apply(self, layer: FusedMoE, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if layer.cpu_dense is not None and layer.cpu_dense.covers(hidden.shape[0]):
            return cpu_experts.dense_experts(hidden, weights, ids, layer.cpu_dense, layer.activation_name)
        if layer.cpu_weights is not None:
            return cpu_experts.moe_cpu_experts(hidden, weights, ids, *layer.cpu_weights, layer.activation_name)
        return stacked_experts(layer, hidden, layer.w13_weight, layer.w2_weight, weights, ids)


class FusedMoE(nn.Module):
    """``forward(hidden [T, H], router_logits [T, E]) -> [T, H]``: each token through its
    ``top_k`` experts (``down(act(gate(x)) * up(x))``), weighted by its routing probabilities."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        renormalize: bool = True,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        method = MoEMethod() if quant_config is None else quant_config.get_moe_method(self, prefix)
        if method is None:
            assert quant_config is not None
            raise ValueError(
                f"{prefix}: the experts of a mixture-of-experts model cannot be served with "
                f"quantization {quant_config.name!r} yet (quantized experts are not implemented "
                "for it; --quantization int8 quantizes them); serve the unquantized checkpoint of this model"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"{prefix}: top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        self.prefix = prefix
        self.activation_name = activation
        self.act_fn = get_act_fn(activation)
        #: Per-expert weights in a CPU kernel's layout (``cpu_experts.moe_cpu_experts``' w13, w2,
        #: scales13, scales2), set by the method after loading; None: the stacked weights.
        self.cpu_weights: tuple[list[torch.Tensor], ...] | None = None
        #: All the experts as one matmul per projection, for the decode step sizes where that is
        #: faster on this CPU (``cpu_experts.DenseExperts``); None: never.
        self.cpu_dense: cpu_experts.DenseExperts | None = None
        self.quant_method = method
        method.create_weights(self, hidden_size, intermediate_size, params_dtype or torch.get_default_dtype())

    def weight_loader(
        self, param: torch.Tensor, loaded_weight: torch.Tensor, expert: int, shard: int | None
    ) -> None:
        """Expert ``expert``'s gate (shard 0) or up (shard 1) into ``w13_weight``, its down
        projection (shard None) into ``w2_weight``."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{self.prefix}: expert {expert} of {self.num_experts} does not exist")
        target = param.data[expert]
        if param is self.w13_weight:
            if shard not in (0, 1):
                raise ValueError(f"{self.prefix}: w13 takes shard 0 (gate) or 1 (up), not {shard}")
            target = target.narrow(0, shard * self.intermediate_size, self.intermediate_size)
        default_weight_loader(target, loaded_weight)

    def needed_shards(self, param_name: str) -> set[tuple[int, int | None]]:
        shards: tuple[int | None, ...] = (0, 1) if param_name == "w13_weight" else (None,)
        return {(expert, shard) for expert in range(self.num_experts) for shard in shards}

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = route_top_k(router_logits, self.top_k, self.renormalize)
        return self.quant_method.apply(self, hidden_states, weights, ids)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, intermediate={self.intermediate_size}, "
            f"renormalize={self.renormalize}, activation={self.activation_name}, "
            f"method={type(self.quant_method).__name__}{', cpu layout' if self.cpu_weights else ''}"
            + (f", dense for {self.cpu_dense.tokens[0]}-{self.cpu_dense.tokens[1]} tokens" if self.cpu_dense else "")
        )
