"""Where a MoE layer's time goes on the CPU at decode sizes: the router, the top-k, sorting the
(token, expert) pairs and their offsets, the gather of rows, the two grouped matmuls, the
activation, and the scatter back with the weighted sum, each timed alone against the whole layer
(``SparseMoEMLP``'s work: router linear, ``route_top_k``, ``grouped_experts``), at
``benchmarks/moe_cpu.sh``'s shape (hidden 384, 8 experts of 512, top-2) by default.

The steps run in the layer's own order with a clock read between each two, and the whole layer
without clocks on every other call; times are medians in thread CPU time, so that a shared,
loaded machine's descheduling is left out (its cache and memory contention is not). Each call
uses the next of ``--layers`` copies of the weights, as a decode step reads each layer's once.
(Timing one step alone in a tight loop flatters it: the small ops then cost 2-9 us, in the
layer's sequence, after a matmul, 10-50 us.)

    OMP_NUM_THREADS=1 python benchmarks/moe_cpu_profile.py [--tokens 1,4,16,64] [--out moe-cpu-profile.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pagedserve.bench.report import format_table, write_result
from pagedserve.plugins.moe import route_top_k
from pagedserve.plugins.moe.layer import _grouped_mm, grouped_experts


def profile_layer(
    x: torch.Tensor, gate_w: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], top_k: int, calls: int
) -> dict[str, float]:
    """The layer's steps in their real order, a clock read between each two, over ``calls``
    calls, each with the next layer's weights; the median of each step in us, and of the whole
    layer run without the clocks (interleaved: every other call)."""
    intermediate = layers[0][1].shape[2]
    times: dict[str, list[float]] = {}
    clock = time.thread_time

    def lap(name: str, begin: float) -> float:
        now = clock()
        times.setdefault(name, []).append(now - begin)
        return clock()

    for call in range(2 * calls + 2):
        w13, w2 = layers[call % len(layers)]
        if call % 2:
            begin = clock()
            grouped_experts(x, w13, w2, *route_top_k(F.linear(x, gate_w), top_k, True), F.silu)
            times.setdefault("whole layer", []).append(clock() - begin)
            continue
        t = clock()
        logits = F.linear(x, gate_w)
        t = lap("router linear", t)
        weights, ids = route_top_k(logits, top_k, renormalize=True)
        t = lap("softmax + top-k", t)
        experts, order = torch.sort(ids.flatten(), stable=True)
        ends = torch.searchsorted(experts, torch.arange(w13.shape[0]), right=True, out_int32=True)
        t = lap("sort pairs + offsets", t)
        rows = x.index_select(0, order // top_k)
        t = lap("gather rows", t)
        gate, up = _grouped_mm(rows, w13, ends).split(intermediate, dim=-1)
        t = lap("gate/up grouped mm", t)
        act = F.silu(gate) * up
        t = lap("activation", t)
        out = _grouped_mm(act, w2, ends)
        t = lap("down grouped mm", t)
        unsorted = torch.empty_like(out).index_copy_(0, order, out)
        (unsorted.view(x.shape[0], top_k, -1) * weights.unsqueeze(-1)).sum(1)
        lap("scatter + weighted sum", t)
    # The first call of each kind is a warm-up.
    return {name: statistics.median(values[1:]) * 1e6 for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4, help="copies of the weights, used in turn")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    h, i, e = args.hidden, args.intermediate, args.experts
    layers = [((torch.randn(e, 2 * i, h) / h**0.5).to(dtype), (torch.randn(e, h, i) / i**0.5).to(dtype))
              for _ in range(args.layers)]  # fmt: skip
    gate_w = (torch.randn(e, h) / h**0.5).to(dtype)
    results, rows = {}, []
    for tokens in (int(t) for t in args.tokens.split(",")):
        steps = profile_layer(torch.randn(tokens, h).to(dtype), gate_w, layers, args.top_k, args.calls)
        whole = steps.pop("whole layer")
        total = sum(steps.values())
        matmuls = steps["gate/up grouped mm"] + steps["down grouped mm"]
        results[str(tokens)] = {"whole_us": whole, "steps_us": steps, "matmul_share": matmuls / total}
        rows.append((f"{tokens} tokens: whole layer / sum of steps",
                     f"{whole:.0f} / {total:.0f} us (grouped matmuls {matmuls / total:.0%} of the steps)"))  # fmt: skip
        rows += [(f"{tokens} tokens:   {name}", f"{us:.1f} us ({us / total:.0%})") for name, us in steps.items()]
    print(format_table(rows))
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        print(f"wrote {write_result(args.out, 'moe-cpu-profile', settings, results, 'cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
