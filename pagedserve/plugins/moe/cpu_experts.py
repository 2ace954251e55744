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

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

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


#: The step sizes (tokens) a layer's experts are timed at, routed against dense. Not one token:
#: its routed step reads only top_k of the experts, which between steps stay partly in the
#: last-level cache, where the cache-flushed timing sees every read from memory; it found dense
#: faster at one token in some processes, and in the engine that step was 28% slower dense
#: (bundled-scale Mixtral, ``-O3`` bf16: 3.74 against 2.93 ms a one-sequence step).
DENSE_CALIBRATION_TOKENS = (2, 4, 8, 16, 32)

#: A layer's experts get a dense copy only up to this many bytes. A per-expert oneDNN call costs
#: tens of µs of set-up whatever its size (docs/benchmarks.md), against about 2 ms to stream
#: 64 MiB of weights at 35 GB/s: above this the set-up the dense matmul saves is a few percent
#: of the time, while it computes E / k times the routed arithmetic, so it cannot pay, and the
#: copy (as large as the experts) would be memory spent for nothing.
DENSE_MAX_BYTES = 64 << 20


@dataclass
class DenseExperts:
    """A MoE layer's experts as one packed matmul per projection over all of them, used for
    steps of ``tokens[0]`` to ``tokens[1]`` tokens (decode steps).

    With a handful of tokens a step routes them to most experts, a row or two each, and a matmul
    per expert pays oneDNN's fixed cost a call (two per expert, plus the loop's Python), which at
    small expert sizes dwarfs the arithmetic. Here every token goes through every expert's gate/up
    in one matmul ([E * 2I, H]), the experts a token did not choose weighted by zero, and the
    down projections of all experts are one matmul over the concatenated intermediates
    ([H, E * I]), which also sums each token's experts. That is E / k times the routed path's
    arithmetic, so it wins only where the calls cost more: the load-time timing
    (``dense_experts_for``) finds the range of step sizes where it does, if any."""

    w13: Tensor  # packed [E * 2I, H]: expert e's gate rows, then its up rows
    w2: Tensor  # packed [H, E * I]
    num_experts: int
    tokens: tuple[int, int]

    def covers(self, num_tokens: int) -> bool:
        return self.tokens[0] <= num_tokens <= self.tokens[1]


def pack_dense(w13: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """Stacked experts ``w13`` [E, 2I, H] and ``w2`` [E, H, I] -> the packed all-experts matrices
    of ``DenseExperts``."""
    num_experts, hidden, intermediate = w2.shape
    w2_all = w2.permute(1, 0, 2).reshape(hidden, num_experts * intermediate)
    return cpu_gemm.pack(w13.reshape(-1, w13.shape[2])), cpu_gemm.pack(w2_all)


def dense_experts(hidden: Tensor, weights: Tensor, ids: Tensor, dense: DenseExperts, activation: str) -> Tensor:
    """What ``moe_cpu_experts`` computes, through every expert at once (``DenseExperts``) ->
    [T, H] in ``hidden``'s dtype. Each expert's intermediate is scaled by the token's routing
    weight for it (zero where it was not chosen), so the down matmul's sum over its input is the
    weighted sum over the token's experts, accumulated in float32 by oneDNN."""
    num_tokens = hidden.shape[0]
    gate_up = cpu_gemm.packed_matmul(hidden.to(dense.w13.dtype), dense.w13, None)
    gate_up = gate_up.view(num_tokens, dense.num_experts, 2, -1)
    routing = torch.zeros(num_tokens, dense.num_experts, dtype=weights.dtype, device=weights.device)
    routing = routing.scatter_(1, ids, weights).to(gate_up.dtype)
    intermediate = get_act_fn(activation)(gate_up[:, :, 0]) * gate_up[:, :, 1] * routing[:, :, None]
    return cpu_gemm.packed_matmul(intermediate.view(num_tokens, -1), dense.w2, None).to(hidden.dtype)


#: The most memory the timing writes to flush the caches before a call (a CPU reporting a huge
#: last-level cache would otherwise have it allocate and write gigabytes 60 times).
FLUSH_MAX_BYTES = 256 << 20

#: (step tokens, the routed call, the dense call) -> their times.
Timer = Callable[[int, Callable[[], object], Callable[[], object]], tuple[float, float]]


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs), 64 MiB where it cannot be read."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=64 << 20)


def time_routed_and_dense(tokens: int, routed: Callable[[], object], dense: Callable[[], object],
                          repeats: int = 9) -> tuple[float, float]:
    """The best times of single calls of the two paths on one step's inputs, each call after
    the caches were flushed by writing twice the last-level cache: in a decode step a layer's
    experts are read once, from memory, and timed hot the dense path (which reads E / k times
    the routed path's weights) looked 1.5x faster at one token where it was not (measured on
    the bundled-scale Mixtral: docs/benchmarks.md). The best of 9 each: with 5, the size up to
    which dense won moved between 16 and 32 from one process to the next, and at 24 sequences
    dense was 1.24x faster in the engine."""
    flush = torch.empty(min(2 * last_level_cache_bytes(), FLUSH_MAX_BYTES) // 4)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((routed, dense)):
            flush.fill_(float(i))
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def dense_experts_for(w13: Tensor, w2: Tensor, packed13: list[Tensor], packed2: list[Tensor], top_k: int,
                      activation: str, timer: Timer | None = None) -> DenseExperts | None:
    """The layer's ``DenseExperts`` when its experts (stacked ``w13``/``w2``, packed per expert
    ``packed13``/``packed2``) are at most ``DENSE_MAX_BYTES`` and the dense path is faster than
    the routed one at some of ``DENSE_CALIBRATION_TOKENS`` on this machine, timed on random
    inputs and routing with the caller's torch threads: used over the longest run of step sizes
    where it won, from its first to its last. None otherwise."""
    if (w13.numel() + w2.numel()) * w13.element_size() > DENSE_MAX_BYTES:
        return None
    key = (tuple(w13.shape), tuple(w2.shape), w13.dtype, top_k, activation, torch.get_num_threads())
    if timer is None and _dense_ranges.get(key, ()) is None:
        return None
    num_experts, hidden_size = w13.shape[0], w13.shape[2]
    dense = DenseExperts(*pack_dense(w13, w2), num_experts=num_experts, tokens=(0, 0))
    if timer is None and key in _dense_ranges:
        return _with_range(dense, _dense_ranges[key])
    generator = torch.Generator().manual_seed(0)
    wins = []
    with torch.inference_mode():
        for tokens in DENSE_CALIBRATION_TOKENS:
            x = torch.randn(tokens, hidden_size, generator=generator).to(w13.dtype)
            logits = torch.randn(tokens, num_experts, generator=generator)
            weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
            routed_time, dense_time = (timer or time_routed_and_dense)(
                tokens,
                lambda: moe_cpu_experts(x, weights, ids, packed13, packed2, [], [], activation),
                lambda: dense_experts(x, weights, ids, dense, activation))
            wins.append(dense_time < routed_time)
    runs = [list(run) for won, run in groupby(DENSE_CALIBRATION_TOKENS, key=dict(zip(DENSE_CALIBRATION_TOKENS, wins)).get)
            if won]
    longest = max(runs, key=len, default=None)
    chosen = None if longest is None else (longest[0], longest[-1])
    if timer is None:
        _dense_ranges[key] = chosen
    return _with_range(dense, chosen)


#: Per layer shape (and dtype, top-k, activation, threads): the step sizes its dense path won at,
#: timed once a process (a model's layers share their shape).
_dense_ranges: dict[tuple, tuple[int, int] | None] = {}


def _with_range(dense: DenseExperts, tokens: tuple[int, int] | None) -> DenseExperts | None:
    if tokens is None:
        return None
    dense.tokens = tokens
    return dense
