"""The MoE workload of ``benchmarks/moe_cpu.sh`` through several engine configurations and
transformers' sequential ``generate``, taking turns in one process (rounds), so that their ratios
come from the same load: the figures a shared machine can still compare.

    python benchmarks/moe_cpu_configs.py SHAPE_DIR [--configs fp32,bf16,int8] [--rounds 2] [--out FILE]
        [--lock /work/wt/bench.lock]

SHAPE_DIR is the Mixtral-shaped folder ``moe_cpu.sh`` writes (random weights: load_format dummy).
Each round runs every configuration on the 64-request workload and transformers (float32, its
fastest dtype here) on the first ``--sequential-prompts``; tokens/s by wall time and by this
process's CPU time, and the load average, are printed and written. The engines run without
prefix caching: every round repeats the same prompts, which a cache would skip after the first.
A configuration ending in ``-O3`` is the same engine with ``compilation_config=3`` (each padded
decode size one inductor graph, the default sizes 1-64), ``-O3-to16`` compiles only sizes 1-16
(larger batches eager), ``-O3-frozen-to16`` adds inductor's freezing; an engine's construction,
the compile, is timed and reported. With ``--lock FILE`` every engine is built (and compiled) first, then the warm-up
and the timed rounds wait for an exclusive ``flock`` on FILE.

Where the time goes: the MoE layers' share of each run's thread CPU time (forward hooks on every
sparse MLP, the router included, for the engine's and transformers' models), and from it the
ratio the engine would reach against transformers if its experts cost nothing: what the rest of
the engine (attention, dense layers, norms, sampling, scheduling) bounds the ratio to.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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
}
#: The compiled step's variants of each: every default size (1-64); only the sizes up to 16 (larger
#: batches eager: where the compiled step was slower, padding included); the same with inductor's
#: freezing (weights folded and prepacked for oneDNN).
SMALL_SIZES = [1, 2, 4, 8, 16]
FROZEN = {"level": 3, "inductor_compile_config": {"freezing": True}}
CONFIGS |= {
    f"{name}{suffix}": {**config, **extra}
    for name, config in list(CONFIGS.items())
    for suffix, extra in (
        ("-O3", {"compilation_config": 3}),
        ("-O3-to16", {"compilation_config": 3, "cuda_graph_sizes": SMALL_SIZES}),
        ("-O3-frozen-to16", {"compilation_config": FROZEN, "cuda_graph_sizes": SMALL_SIZES}),
    )
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

    def __init__(self, model: torch.nn.Module | None) -> None:
        """``model`` None: no hooks (a compiled engine's graphs would break on them); the share
        is then NaN."""
        self.timed = model is not None
        self.seconds = 0.0 if self.timed else float("nan")
        self._start = 0.0
        for module in model.modules() if model is not None else ():
            if "SparseMoe" in type(module).__name__ or type(module).__name__ == "SparseMoEMLP":
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)

    def _enter(self, *_: Any) -> None:
        self._start = time.thread_time()

    def _leave(self, *_: Any) -> None:
        self.seconds += time.thread_time() - self._start

    def measure(self, run: Any) -> tuple[Any, float, float]:
        """``run()``'s result, its thread CPU seconds, and the part of them in the MoE layers."""
        self.seconds, begin = 0.0 if self.timed else float("nan"), time.thread_time()
        result = run()
        return result, time.thread_time() - begin, self.seconds


@contextlib.contextmanager
def locked(path: str | None) -> Any:
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("shape")
    parser.add_argument("--configs", default="fp32,bf16,int8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--sequential-prompts", type=int, default=8)
    parser.add_argument("--warmup-prompts", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--lock", default=None)
    args = parser.parse_args()
    names = args.configs.split(",")
    engines, start_seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        llm = LLM(args.shape, load_format="dummy", max_model_len=512, enable_prefix_caching=False, **CONFIGS[name])
        engines[name], start_seconds[name] = llm.engine, time.perf_counter() - start
        print(f"{name}: engine built in {start_seconds[name]:.1f} s", flush=True)
    timers = {name: MoETimer(None if "compilation_config" in CONFIGS[name] else engine.runner.model)
              for name, engine in engines.items()}
    vocab = 4096
    workload = make_workload("sharegpt", args.num_prompts, vocab, 512, seed=0)
    warmup = make_workload("sharegpt", args.warmup_prompts, vocab, 512, seed=1)
    hf = load_hf_model(args.shape, torch.float32, "cpu", random_weights=True)
    timers["hf-sequential"] = MoETimer(hf)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in [*names, "hf-sequential"]}
    with locked(args.lock):
        for engine in engines.values():
            run_throughput(engine, warmup)
        hf_sequential(hf, warmup[:2])
        print("warmed up", flush=True)
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
            if rest_ms == rest_ms:  # not NaN: the MoE layers were timed
                rows.append((f"{name}: bound with free experts", f"{hf_ms / rest_ms:.1f}x (thread CPU time)"))
    print(format_table(rows))
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"} | {
            "threads": torch.get_num_threads(), "engine_start_seconds": start_seconds}
        print(f"wrote {write_result(args.out, 'moe-cpu-configs', settings, results, 'cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
