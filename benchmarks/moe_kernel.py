"""GPU benchmark of the fused MoE kernel (``plugins/moe/triton_moe.py``) against a loop over
experts (one gate/up and one down matmul per expert that has tokens, launched from Python, as
transformers' eager experts do) and against the torch path (``plugins/moe/layer.py:
grouped_experts``, two ``torch.nn.functional.grouped_mm`` calls) at Mixtral-8x7B's layer shape
(hidden 4096, 8 experts of 14336, top-2), measured in the same run, for 1 to 4096 tokens a step.
Also checks that all three give the same result.

    python benchmarks/moe_kernel.py [--dtype bfloat16] [--out benchmarks/results/moe-kernel-gpu.json]
    python benchmarks/moe_kernel.py --tiny   # tiny shapes; without a GPU, the kernel interpreted (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve.bench.report import format_table, write_result
from pagedserve.plugins.moe import route_top_k
from pagedserve.plugins.moe.layer import grouped_experts

FULL = {"hidden": 4096, "intermediate": 14336, "experts": 8, "top_k": 2, "tokens": (1, 4, 16, 64, 256, 1024, 4096)}
TINY = {"hidden": 64, "intermediate": 96, "experts": 4, "top_k": 2, "tokens": (1, 9)}


def loop_over_experts(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The baseline: for each expert that has tokens (a host sync to find them), its tokens
    gathered, two matmuls, and the weighted rows added back into their tokens."""
    intermediate = w2.shape[2]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in ids.unique().tolist():
        token, slot = torch.where(ids == expert)
        gate, up = F.linear(hidden[token], w13[expert]).split(intermediate, dim=-1)
        down = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, token, down.float() * weights[token, slot, None])
    return out.to(hidden.dtype)


def median_ms(fn: Callable[[], object], cuda: bool, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on a GPU, float32 interpreted")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run, on the CPU if no GPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("needs a CUDA GPU (or --tiny, which interprets the kernel on the CPU)", file=sys.stderr)
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is imported, below
    from pagedserve.plugins.moe import triton_moe

    shape = TINY if args.tiny else FULL
    device = "cuda" if cuda else "cpu"
    # bf16 arithmetic is wrong in Triton's interpreter: float32 there.
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    hidden_size, intermediate, experts, top_k = (shape[k] for k in ("hidden", "intermediate", "experts", "top_k"))
    torch.manual_seed(0)
    w13 = torch.randn(experts, 2 * intermediate, hidden_size, device=device, dtype=dtype) / hidden_size**0.5
    w2 = torch.randn(experts, hidden_size, intermediate, device=device, dtype=dtype) / intermediate**0.5
    rows, results = [], {}
    for tokens in shape["tokens"]:
        x = torch.randn(tokens, hidden_size, device=device, dtype=dtype)
        weights, ids = route_top_k(torch.randn(tokens, experts, device=device), top_k, renormalize=True)
        methods = {
            "fused": lambda: triton_moe.fused_experts(x, w13, w2, weights, ids),
            "grouped_mm": lambda: grouped_experts(x, w13, w2, weights, ids, F.silu),
            "loop": lambda: loop_over_experts(x, w13, w2, weights, ids),
        }
        reference = methods["loop"]()
        errors = {name: rel_err(fn(), reference) for name, fn in methods.items() if name != "loop"}
        # The interpreted kernel takes a second a call: a smoke run times it twice.
        ms = {name: median_ms(fn, cuda, *((20, 3) if cuda else (2, 0))) for name, fn in methods.items()}
        results[str(tokens)] = {
            **{f"{name}_ms": value for name, value in ms.items()},
            "speedup_vs_loop": ms["loop"] / ms["fused"],
            "speedup_vs_grouped_mm": ms["grouped_mm"] / ms["fused"],
            **{f"{name}_rel_err": value for name, value in errors.items()},
        }
        rows.append((f"{tokens} tokens: fused / grouped_mm / loop ms",
                     f"{ms['fused']:.3f} / {ms['grouped_mm']:.3f} / {ms['loop']:.3f}: fused "
                     f"{ms['loop'] / ms['fused']:.2f}x the loop, {ms['grouped_mm'] / ms['fused']:.2f}x grouped_mm "
                     f"(rel err {errors['fused']:.1e}, {errors['grouped_mm']:.1e})"))  # fmt: skip
    print(format_table(rows))
    worst = max(max(r["fused_rel_err"], r["grouped_mm_rel_err"]) for r in results.values())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if args.out:
        settings = {"hidden": hidden_size, "intermediate": intermediate, "experts": experts, "top_k": top_k,
                    "dtype": str(dtype).removeprefix("torch."), "interpreted": not cuda}  # fmt: skip
        print(f"wrote {write_result(Path(args.out), 'moe-kernel', settings, results, device)}")
    if worst > tolerance:
        print(f"the methods disagree: relative error {worst:.1e} > {tolerance:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
