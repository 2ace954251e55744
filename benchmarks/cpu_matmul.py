"""The CPU matmul kernels a decode step can use, on SmolLM-135M's linear shapes (issue 22): float32
and bfloat16 ``F.linear``, and ``torch._weight_int8pack_mm`` (int8 weights, per-channel scales)
with float32 and with bfloat16 activations, at 1 and 64 rows; microseconds per call, one thread.

    python benchmarks/cpu_matmul.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: (in, out) features: merged q/k/v, o, merged gate/up, down, the LM head.
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]


def microseconds(fn: Callable[[], torch.Tensor], repeats: int = 50) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    torch.set_num_threads(1)
    caps = torch.cpu.get_capabilities()
    print(torch.backends.cpu.get_cpu_capability(), {k: caps.get(k) for k in ("amx_bf16", "avx512_bf16")})
    print("| rows | in x out | fp32 | bf16 | int8, fp32 activations | int8, bf16 activations |")
    print("|---|---|---|---|---|---|")
    for rows in (1, 64):
        for k, n in SHAPES:
            w, x = torch.randn(n, k), torch.randn(rows, k)
            wb, xb = w.bfloat16(), x.bfloat16()
            scale = w.abs().amax(1) / 127
            q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            times = [
                microseconds(lambda: F.linear(x, w)),
                microseconds(lambda: F.linear(xb, wb)),
                microseconds(lambda: torch._weight_int8pack_mm(x, q, scale)),
                microseconds(lambda: torch._weight_int8pack_mm(xb, q, scale.bfloat16())),
            ]
            print(f"| {rows} | {k} x {n} | " + " | ".join(f"{t:,.0f}" for t in times) + " |")


if __name__ == "__main__":
    main()
