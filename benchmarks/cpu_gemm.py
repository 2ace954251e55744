"""oneDNN prepacked weights against MKL's ``F.linear`` on the CPU (docs/benchmarks.md, "oneDNN
prepacked weights"): microseconds a call on the bundled model's and its draft's linear shapes at
1, 5 and 64 rows, then the bundled model end to end in one process, an engine with its layers
packed (``core/layers/cpu_gemm.py``) and one without taking turns: batch 1 over the 30 held-out
stdlib prompts x 128 tokens, and 64 requests of 32-256 prompt and 16-256 output tokens. Between
the two, ``cold_pass``: the bundled model's 17 weights multiplied in a decode step's order, as a
step reads them (each from memory once the others have passed through the cache), over four
copies in turn and over one copy (which may stay in the L3 cache).

    OMP_NUM_THREADS=2 python benchmarks/cpu_gemm.py
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedserve import LLM, SamplingParams
from pagedserve.bench.latency import make_prompts
from pagedserve.core.layers import cpu_gemm

#: (in, out): tiny-py's qkv, gate_up, down and LM head; the draft's qkv and LM head.
SHAPES = [(384, 640), (384, 2048), (1024, 384), (384, 4096), (128, 384), (128, 4096)]


def best_microseconds(fn: Callable[[], object], calls: int = 100, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def matmuls() -> None:
    print(f"torch threads {torch.get_num_threads()}; F.linear (MKL) / packed (oneDNN), µs a call")
    with torch.inference_mode():
        for k, n in SHAPES:
            weight = torch.randn(n, k)
            packed = cpu_gemm.pack(weight)
            cells = []
            for rows in (1, 5, 64):
                x = torch.randn(rows, k)
                dense = best_microseconds(lambda: F.linear(x, weight))
                onednn = best_microseconds(lambda: cpu_gemm.packed_linear(x, packed, None))
                cells.append(f"{rows} rows {dense:7.1f} / {onednn:7.1f}")
            print(f"{k:5d} x {n:5d}: " + "   ".join(cells))


#: (out, in) of tiny-py's weights in a decode step's order: 4 layers of qkv, o, gate_up, down; the head.
STEP_WEIGHTS = [(640, 384), (384, 384), (2048, 384), (384, 1024)] * 4 + [(4096, 384)]


def cold_pass(copies: int, passes: int = 40) -> None:
    """ms for one pass over ``STEP_WEIGHTS`` at 1-16 rows, the passes taking ``copies`` copies
    of the weights in turn: MKL's ``F.linear`` against oneDNN on weights packed for 1, 4, 16 and
    64 rows (``_reorder_linear_weight``'s hint)."""
    weights = [[torch.randn(n, k) for n, k in STEP_WEIGHTS] for _ in range(copies)]
    megabytes = sum(w.numel() * 4 for w in weights[0]) / 1e6
    print(f"one pass over {megabytes:.1f} MB of weights, {copies} copies in turn: ms (GB/s)")
    hints = (1, 4, 16, 64)
    packed = {hint: [[torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in copy] for copy in weights]
              for hint in hints}
    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16):
            inputs = {k: torch.randn(rows, k) for _, k in STEP_WEIGHTS}
            dense = [[lambda w=w: F.linear(inputs[w.shape[1]], w) for w in copy] for copy in weights]
            cells = [("MKL", dense)] + [
                (f"packed {hint}", [[lambda w=w, p=p: cpu_gemm.packed_linear(inputs[w.shape[1]], p, None)
                                     for w, p in zip(copy, packs)] for copy, packs in zip(weights, packed[hint])])
                for hint in hints]
            line = []
            for name, calls in cells:
                ms = min(_timed_passes(calls, passes) for _ in range(5)) * 1e3
                line.append(f"{name} {ms:.2f} ({megabytes / ms:.0f})")
            print(f"{rows:2d} rows: " + ", ".join(line))


def _timed_passes(calls: list[list[Callable[[], object]]], passes: int) -> float:
    start = time.perf_counter()
    for i in range(passes):
        for call in calls[i % len(calls)]:
            call()
    return (time.perf_counter() - start) / passes


def engines() -> None:
    available = cpu_gemm.onednn_available
    cpu_gemm.onednn_available = lambda: False  # the engine as it was: every layer on F.linear
    try:
        runs = {"F.linear": LLM("pagedserve/tiny-py")}
    finally:
        cpu_gemm.onednn_available = available
    runs["packed"] = LLM("pagedserve/tiny-py")
    prompts = make_prompts("stdlib", runs["packed"].engine, 31, 256, 128, 0)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    seconds = dict.fromkeys(runs, 0.0)
    for i, prompt in enumerate(prompts):  # the first is the warm-up
        for name, llm in runs.items():
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            seconds[name] += (time.perf_counter() - start) if i else 0.0
    report("batch 1", {name: 30 * 128 / s for name, s in seconds.items()})
    rng = random.Random(0)
    batch = [({"prompt_token_ids": prompts[i % 30][: rng.randint(32, 256)]},
              SamplingParams(temperature=0.0, max_tokens=rng.randint(16, 256), ignore_eos=True)) for i in range(64)]
    tokens = sum(p.max_tokens for _, p in batch)
    seconds = dict.fromkeys(runs, 0.0)
    for round_ in range(4):
        for name, llm in runs.items():
            start = time.perf_counter()
            llm.generate([b[0] for b in batch], [b[1] for b in batch], use_tqdm=False)
            seconds[name] += (time.perf_counter() - start) if round_ else 0.0
    report("64 requests", {name: 3 * tokens / s for name, s in seconds.items()})


def report(what: str, tokens_per_s: dict[str, float]) -> None:
    ratio = tokens_per_s["packed"] / tokens_per_s["F.linear"]
    print(f"{what}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in tokens_per_s.items()) + f"; packed {ratio:.3f}x")


if __name__ == "__main__":
    matmuls()
    cold_pass(copies=4)
    cold_pass(copies=1)
    engines()
