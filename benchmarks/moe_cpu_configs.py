"""The MoE workload of ``benchmarks/moe_cpu.sh`` through several engine configurations and
transformers' sequential ``generate``, taking turns in one process (rounds), so that their ratios
come from the same load: the figures a shared machine can still compare.

    python benchmarks/moe_cpu_configs.py SHAPE_DIR [--configs fp32,bf16,int8] [--rounds 2] [--out FILE]

SHAPE_DIR is the Mixtral-shaped folder ``moe_cpu.sh`` writes (random weights: load_format dummy).
Each round runs every configuration on the 64-request workload and transformers (float32, its
fastest dtype here) on the first ``--sequential-prompts``; tokens/s by wall time and by this
process's CPU time, and the load average, are printed and written. The engines run without
prefix caching: every round repeats the same prompts, which a cache would skip after the first.

Where the time goes: the MoE layers' share of each run's thread CPU time (forward hooks on every
sparse MLP, the router included, for the engine's and transformers' models), and from it the
ratio the engine would reach against transformers if its experts cost nothing: what the rest of
the engine (attention, dense layers, norms, sampling, scheduling) bounds the ratio to.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Any

import torch

from pagedserve import LLM
from pagedserve.bench.hf_baseline import hf_sequential, load_hf_model
from pagedserve.bench.report import format_table, write_result
from pagedserve.bench.throughput import run_throughput
from pagedserve.bench.workload import make_workload

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "bf16-int8": {"dtype": "bfloat16", "quantization": "int8"},
    "bf16-compiled": {"dtype": "bfloat16", "torch_compile": True},
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(run: Any) -> tuple[dict[str, Any], float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


class MoETimer:
    """Thread CPU seconds spent inside the sparse MLP modules of ``model`` (forward hooks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._start = 0.0
        for module in model.modules():
            if "SparseMoe" in type(module).__name__ or type(module).__name__ == "SparseMoEMLP":
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)

    def _enter(self, *_: Any) -> None:
        self._start = time.thread_time()

    def _leave(self, *_: Any) -> None:
        self.seconds += time.thread_time() - self._start

    def measure(self, run: Any) -> tuple[Any, float, float]:
        """``run()``'s result, its thread CPU seconds, and the part of them in the MoE layers."""
        self.seconds, begin = 0.0, time.thread_time()
        result = run()
        return result, time.thread_time() - begin, self.seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("shape")
    parser.add_argument("--configs", default="fp32,bf16,int8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--sequential-prompts", type=int, default=8)
    parser.add_argument("--warmup-prompts", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = args.configs.split(",")
    engines = {
        name: LLM(args.shape, load_format="dummy", max_model_len=512, enable_prefix_caching=False, **CONFIGS[name]).engine
        for name in names
    }
    timers = {name: MoETimer(engine.runner.model) for name, engine in engines.items()}
    vocab = 4096
    workload = make_workload("sharegpt", args.num_prompts, vocab, 512, seed=0)
    warmup = make_workload("sharegpt", args.warmup_prompts, vocab, 512, seed=1)
    hf = load_hf_model(args.shape, torch.float32, "cpu", random_weights=True)
    timers["hf-sequential"] = MoETimer(hf)
    for engine in engines.values():
        run_throughput(engine, warmup)
    hf_sequential(hf, warmup[:2])
    print("warmed up", flush=True)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in [*names, "hf-sequential"]}
    for _ in range(args.rounds):
        runs = {name: lambda engine=engine: run_throughput(engine, workload) for name, engine in engines.items()}
        runs["hf-sequential"] = lambda: hf_sequential(hf, workload[: args.sequential_prompts])
        for name, run in runs.items():
            (result, thread_cpu, moe_cpu), wall, cpu = timed(lambda run=run, name=name: timers[name].measure(run))
            tokens = result["output_tokens"]
            results[name].append({
                "tok_s": tokens / wall, "tok_cpu_s": tokens / cpu, "load": os.getloadavg()[0],
                "thread_cpu_ms_per_token": 1e3 * thread_cpu / tokens, "moe_share": moe_cpu / thread_cpu,
            })  # fmt: skip
            print(name, results[name][-1], flush=True)
    best_hf = max(r["tok_s"] for r in results["hf-sequential"])
    best_hf_cpu = max(r["tok_cpu_s"] for r in results["hf-sequential"])
    rows = []
    for name, runs in results.items():
        wall = " / ".join(f"{r['tok_s']:.0f}" for r in runs)
        cpu = " / ".join(f"{r['tok_cpu_s']:.0f}" for r in runs)
        ratio = max(r["tok_s"] for r in runs) / best_hf
        ratio_cpu = max(r["tok_cpu_s"] for r in runs) / best_hf_cpu
        loads = " / ".join(f"{r['load']:.1f}" for r in runs)
        share = " / ".join(f"{r['moe_share']:.0%}" for r in runs)
        rows.append((name, f"tok/s {wall}; tok/CPU-s {cpu}; best vs hf {ratio:.1f}x wall, {ratio_cpu:.1f}x CPU; "
                           f"MoE layers {share} of the CPU time; load {loads}"))  # fmt: skip
        if name != "hf-sequential":
            hf_ms = min(r["thread_cpu_ms_per_token"] for r in results["hf-sequential"])
            rest_ms = min(r["thread_cpu_ms_per_token"] * (1 - r["moe_share"]) for r in runs)
            rows.append((f"{name}: bound with free experts", f"{hf_ms / rest_ms:.1f}x (thread CPU time)"))
    print(format_table(rows))
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"} | {"threads": torch.get_num_threads()}
        print(f"wrote {write_result(args.out, 'moe-cpu-configs', settings, results, 'cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
