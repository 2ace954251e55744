"""The experts on the CPU with weights laid out once for its matmul kernels, a matmul per expert
that has rows.

Two layouts, chosen after loading (``FusedMoE``'s methods):

- **bfloat16 or float32 in oneDNN's layout** (``pack_onednn``): each expert's two matrices
  reordered once into the blocked layout oneDNN's kernels read (``mkldnn._reorder_linear_weight``,
  what inductor's freezing does to a linear layer's weight). A bf16 matmul on a plain weight
  re-lays the weight out at every call, which made small bf16 matmuls slower than float32 ones;
  float32 experts are packed where timing at load says oneDNN wins at a decode step's few rows
  an expert (``packs``; MKL's few-row sgemm is slow on some CPUs: docs/benchmarks.md).
- **int8** (``--quantization int8``): each expert's rows ``round(W / s)`` with a scale per
  output channel, a quarter of float32's bytes, multiplied as ``plugins/quant/int8.py``'s
  ``int8_cpu_matmul`` multiplies a linear layer (``int8_cpu_kernel``): an expert with few rows
  by the weight-only kernel (``torch._weight_int8pack_mm``, bfloat16 or the model's
  activations), one with more int8 by int8 on its rows quantized per row (quantized once for all
  the experts of a projection), one with a prefill's rows by its weight dequantized.

The per-expert loop needs each expert's row count on the host; on the CPU reading it is no
device sync, and under ``torch.compile`` each projection's loop is one custom op
(``pagedserve::moe_cpu_experts_matmul``): no graph break, no data-dependent shapes, and the rest
of the layer (sort, gather, activation, weighted sum) compiled with the graph around it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pagedserve.core.layers import cpu_gemm
from pagedserve.core.layers.activation import get_act_fn
from pagedserve.plugins.quant.int8 import int8_cpu_kernel, int8_cpu_matmul, quantize_rows

#: float32 experts are packed when oneDNN is the faster from at most this many rows: a decode
#: step of 16 sequences routing each token to 2 of 8 experts gives an expert 4 rows.
FLOAT32_PACKED_FROM_ROWS = 4


def onednn_available() -> bool:
    """oneDNN's bf16 matmul kernels are there and native on this CPU (avx512_bf16 or AMX)."""
    caps = torch.cpu.get_capabilities()
    return torch.backends.mkldnn.is_available() and bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def packs(w13: Tensor, w2: Tensor) -> bool:
    """Whether a CPU MoE layer's stacked experts ([E, N, K]) go to oneDNN's layout: bf16 where
    the CPU has bf16 units; float32 where ``cpu_gemm.packed_from_rows``, timing the first
    expert's two matrices, finds oneDNN faster from ``FLOAT32_PACKED_FROM_ROWS`` rows or fewer
    (else float32 keeps the grouped matmuls, bitwise transformers' arithmetic)."""
    if w13.dtype == torch.bfloat16:
        return onednn_available()
    if w13.dtype != torch.float32 or not cpu_gemm.onednn_available():
        return False
    with torch.inference_mode():
        for weight in (w13[0], w2[0]):
            rows = cpu_gemm.packed_from_rows(weight, cpu_gemm.pack(weight))
            if rows is None or rows > FLOAT32_PACKED_FROM_ROWS:
                return False
    return True


def pack_onednn(weights: Tensor) -> list[Tensor]:
    """``weights`` [E, N, K] (bf16 or float32) -> one oneDNN-layout [N, K] weight per expert."""
    return [cpu_gemm.pack(w) for w in weights]


def experts_matmul(
    x: Tensor, ends: Tensor, row_experts: Tensor, weights: list[Tensor], scales: list[Tensor]
) -> Tensor:
    """The rows ``x`` sorted by expert (``row_experts``: each row's expert; ``ends[e]``: one past
    expert ``e``'s last row), each expert's rows by its weight -> ``[rows, N]``. int8: when most
    rows go int8 by int8 (a decode step), every group does, on the rows quantized once, into one
    int32 product rescaled once by each row's scale and its expert's channel scales; otherwise (a
    prefill, most experts with rows enough to dequantize their weight) each group by
    ``int8_cpu_matmul``'s own choice.

    Under ``torch.compile`` this is the opaque op ``pagedserve::moe_cpu_experts_matmul`` (whose
    implementation is this function, run eagerly): the loop needs each expert's row count on the
    host (on the CPU reading it is no device sync), so only the matmuls are opaque and inductor
    fuses the routing, gather, activation and weighted sum around them into its own kernels."""
    if torch.compiler.is_compiling():
        return _experts_matmul_op(x, ends, row_experts, weights, scales)
    groups, start = [], 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            groups.append((expert, start, end))
        start = end
    out = x.new_empty(x.shape[0], weights[0].shape[0])
    if not scales:
        for expert, start, end in groups:
            out[start:end] = cpu_gemm.packed_linear(x[start:end], weights[expert], None)
        return out
    gemm_rows = sum(
        end - start for e, start, end in groups if int8_cpu_kernel(end - start, weights[e]) == "int8_gemm"
    )
    if 2 * gemm_rows >= x.shape[0]:
        q, row_scale = quantize_rows(x)
        products = out.new_empty(out.shape, dtype=torch.int32)
        for expert, start, end in groups:
            torch._int_mm(q[start:end], weights[expert].t(), out=products[start:end])
        channel_scales = torch.stack(scales).index_select(0, row_experts)
        return (products * row_scale).mul_(channel_scales).to(x.dtype)
    for expert, start, end in groups:
        out[start:end] = int8_cpu_matmul(x[start:end], weights[expert], scales[expert])
    return out


_experts_matmul_op = torch.library.custom_op("pagedserve::moe_cpu_experts_matmul", experts_matmul, mutates_args=())


@_experts_matmul_op.register_fake
def _(x: Tensor, ends: Tensor, row_experts: Tensor, weights: list[Tensor], scales: list[Tensor]) -> Tensor:
    return x.new_empty(x.shape[0], weights[0].shape[0])


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

    ``w13``/``w2``: one weight per expert, oneDNN-packed bf16 or float32 (``scales*`` empty) or int8 with
    per-output-channel ``scales*`` (whose dtype is the activations'). The (token, expert) pairs
    are sorted by expert once; each projection is a matmul per expert with rows
    (``experts_matmul``), and the activation one op over all the rows."""
    num_tokens, top_k = ids.shape
    dtype = scales13[0].dtype if scales13 else w13[0].dtype
    row_experts, order = torch.sort(ids.flatten(), stable=True)
    ends = torch.searchsorted(row_experts, torch.arange(len(w13), device=ids.device), right=True)
    rows = hidden.to(dtype).index_select(0, order // top_k)
    gate, up = experts_matmul(rows, ends, row_experts, w13, scales13).chunk(2, dim=-1)
    out = experts_matmul(get_act_fn(activation)(gate) * up, ends, row_experts, w2, scales2)
    unsorted = torch.empty_like(out).index_copy_(0, order, out)
    return (unsorted.view(num_tokens, top_k, -1) * weights.unsqueeze(-1)).sum(1).to(hidden.dtype)
