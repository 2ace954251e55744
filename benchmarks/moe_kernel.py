"""GPU benchmark of the fused MoE kernel (``plugins/moe/triton_moe.py``) against the loop over
experts (``plugins/moe/layer.py:grouped_experts``, one gate/up and one down matmul per expert that
has tokens) at Mixtral-8x7B's layer shape (hidden 4096, 8 experts of 14336, top-2), measured in the
same run, for 1 to 4096 tokens a step. Also checks that both give the same result.

    python benchmarks/moe_kernel.py [--dtype bfloat16] [--out benchmarks/results/moe-kernel-gpu.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve.bench.report import format_table, write_result
from pagedserve.plugins.moe import route_top_k
from pagedserve.plugins.moe.layer import grouped_experts

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 4096, 14336, 8, 2
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)


def median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from pagedserve.plugins.moe import triton_moe

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    w13 = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, device="cuda", dtype=dtype) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, device="cuda", dtype=dtype) / INTERMEDIATE**0.5
    rows, results = [], {}
    for tokens in TOKENS:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype)
        weights, ids = route_top_k(torch.randn(tokens, EXPERTS, device="cuda"), TOP_K, renormalize=True)
        fused = triton_moe.fused_experts(x, w13, w2, weights, ids)
        looped = grouped_experts(x, w13, w2, weights, ids, F.silu)
        rel_err = ((fused.float() - looped.float()).abs().max() / looped.float().abs().max()).item()
        fused_ms = median_ms(lambda: triton_moe.fused_experts(x, w13, w2, weights, ids))
        loop_ms = median_ms(lambda: grouped_experts(x, w13, w2, weights, ids, F.silu))
        results[str(tokens)] = {"fused_ms": fused_ms, "loop_ms": loop_ms, "speedup": loop_ms / fused_ms,
                                "rel_err": rel_err}  # fmt: skip
        rows.append((f"{tokens} tokens: fused / loop ms, speed-up", f"{fused_ms:.3f} / {loop_ms:.3f}, "
                     f"{loop_ms / fused_ms:.2f}x (rel err {rel_err:.1e})"))  # fmt: skip
    print(format_table(rows))
    if args.out:
        settings = {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "experts": EXPERTS, "top_k": TOP_K,
                    "dtype": args.dtype}  # fmt: skip
        print(f"wrote {write_result(Path(args.out), 'moe-kernel', settings, results, 'cuda')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
