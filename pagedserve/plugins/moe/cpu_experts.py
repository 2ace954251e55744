"""The experts on the CPU with weights laid out once for its matmul kernels, a matmul per expert
that has rows.

Two layouts, chosen after loading (``FusedMoE``'s methods):

- **bfloat16 in oneDNN's layout** (``pack_onednn``): each expert's two matrices reordered once
  into the blocked layout oneDNN's (AMX) kernels read (``mkldnn._reorder_linear_weight``, what
  inductor's freezing does to a linear layer's weight). A bf16 matmul on a plain weight re-lays
  the weight out at every call, which made small bf16 matmuls slower than float32 ones.
- **int8 weight-only** (``--quantization int8``): each expert's rows ``round(W / s)`` with a
  scale per output channel, multiplied by ``torch._weight_int8pack_mm`` with bfloat16 (or the
  model's) activations, a quarter of float32's bytes (see ``plugins/quant/int8.py``).

The per-expert loop needs each expert's row count on the host; on the CPU reading it is no
device sync, and the whole computation is one custom op (``pagedserve::moe_cpu_experts``) so that
``torch.compile`` sees one opaque node, no graph break and no data-dependent shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pagedserve.core.layers.activation import get_act_fn

#: The activation dtype of oneDNN-packed experts (the only packed layout built here).
ONEDNN_DTYPE = torch.bfloat16


def onednn_available() -> bool:
    """oneDNN's bf16 matmul kernels are there and native on this CPU (avx512_bf16 or AMX)."""
    caps = torch.cpu.get_capabilities()
    return torch.backends.mkldnn.is_available() and bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def pack_onednn(weights: Tensor) -> list[Tensor]:
    """``weights`` [E, N, K] bf16 -> one oneDNN-layout [N, K] weight per expert."""
    return [torch.ops.mkldnn._reorder_linear_weight(w.contiguous()) for w in weights]


def _onednn_matmul(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@torch.library.custom_op("pagedserve::moe_cpu_experts", mutates_args=())
def moe_cpu_experts(
    hidden: Tensor,
    weights: Tensor,
    ids: Tensor,
    w13: list[Tensor],
    w2: list[Tensor],
    scales13: list[Tensor],
    scales2: list[Tensor],
    activation: str,
) -> Tensor:
    """Each token's ``top_k`` experts (``ids`` [T, k], routing ``weights`` [T, k] float32),
    ``w2 @ act(gate) * up`` weighted and summed per token -> [T, H] in ``hidden``'s dtype.

    ``w13``/``w2``: one weight per expert, oneDNN-packed bf16 (``scales*`` empty) or int8 with
    per-output-channel ``scales*`` (whose dtype is the activations')."""
    num_tokens, top_k = ids.shape
    int8 = bool(scales13)
    dtype = scales13[0].dtype if int8 else ONEDNN_DTYPE
    act_fn = get_act_fn(activation)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(w13)).tolist()
    rows = hidden.to(dtype).index_select(0, order // top_k)
    out = torch.empty(num_tokens * top_k, w2[0].shape[0], dtype=dtype)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        end = start + count
        if int8:
            gate_up = torch._weight_int8pack_mm(rows[start:end], w13[expert], scales13[expert])
        else:
            gate_up = _onednn_matmul(rows[start:end], w13[expert])
        gate, up = gate_up.chunk(2, dim=-1)
        inner = act_fn(gate) * up
        if int8:
            out[start:end] = torch._weight_int8pack_mm(inner, w2[expert], scales2[expert])
        else:
            out[start:end] = _onednn_matmul(inner, w2[expert])
        start = end
    unsorted = torch.empty_like(out).index_copy_(0, order, out)
    return (unsorted.view(num_tokens, top_k, -1) * weights.unsqueeze(-1)).sum(1).to(hidden.dtype)


@moe_cpu_experts.register_fake
def _(
    hidden: Tensor,
    weights: Tensor,
    ids: Tensor,
    w13: list[Tensor],
    w2: list[Tensor],
    scales13: list[Tensor],
    scales2: list[Tensor],
    activation: str,
) -> Tensor:
    return torch.empty_like(hidden)
