"""Where a CPU decode step's time goes (issue 22): the engine's steady decode at a batch size,
profiled with torch.profiler, its time split into the model's linear layers, attention (the KV
gather, SDPA, the cache write), norms/rope/activation, the LM head, sampling and what is left
(Python, dispatch, scheduling, detokenization); and the same linear shapes as bare ``torch.mm``
calls, to tell torch's matmul speed from the engine's overhead around it.

Usage: python benchmarks/cpu_profile.py MODEL [--batch 1,64] [--dtype float32] [--steps 32]
       [--quantization int8] [--output-json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from pagedserve import LLM, SamplingParams

#: Profiler op names, by the part of a step they belong to (the first matching prefix wins).
CATEGORIES = [
    ("kv gather (index_select)", ("aten::index_select",)),
    ("kv write (index_copy_)", ("aten::index_copy_",)),
    ("sdpa", ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax", "aten::bmm")),
    ("linear (mm/addmm/int8)", ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::linear")),
    ("norm/rope/act (elementwise)", ("aten::mul", "aten::add", "aten::rsqrt", "aten::pow", "aten::mean",
                                      "aten::silu", "aten::cat", "aten::neg", "aten::cos", "aten::sin",
                                      "aten::sub", "aten::div", "aten::rms_norm", "aten::_fused_rms_norm")),
    ("sampling (argmax/sort/softmax)", ("aten::argmax", "aten::max", "aten::sort", "aten::topk",
                                         "aten::log_softmax", "aten::_log_softmax", "aten::softmax")),
    ("copies/casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")),
]


def categorize(name: str) -> str:
    for category, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return category
    return "other torch ops"


def decode_profile(llm: LLM, batch: int, steps: int, prompt_len: int) -> dict:
    engine = llm.engine
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=2 * steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        ids = [(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(prompt_len)]
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    unprofiled = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
    engine.abort_request([f"r{i}" for i in range(batch)])
    while engine.has_unfinished_requests():
        engine.step()
    shares: dict[str, float] = collections.Counter()
    linear_shapes: collections.Counter = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        # Self CPU time: each microsecond counted once, in the op that spent it.
        shares[categorize(event.key)] += event.self_cpu_time_total / 1e6
        if event.key in ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm") and event.input_shapes:
            linear_shapes[(event.key, json.dumps(event.input_shapes))] += event.count
    torch_total = sum(shares.values())
    shares["python/dispatch/scheduler (not in any op)"] = max(wall - torch_total, 0.0)
    return {
        "batch": batch,
        "steps": steps,
        "step_ms": unprofiled / steps * 1e3,
        "tokens_per_s": batch * steps / unprofiled,
        #: The profiler's own cost inflates the time outside ops most: shares are of this total.
        "profiled_step_ms": wall / steps * 1e3,
        "breakdown_ms_per_step": {k: v / steps * 1e3 for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
        "linear_calls": [(op, shapes, n // steps) for (op, shapes), n in linear_shapes.most_common()],
    }


def bare_mm(calls: list, repeats: int = 20) -> float:
    """Milliseconds per step for the same matmul shapes (once each per step) called directly."""
    total = 0.0
    for op, shapes, per_step in calls:
        x_shape, w_shape = json.loads(shapes)[:2] if op != "aten::addmm" else json.loads(shapes)[1:3]
        if not x_shape or not w_shape:
            continue
        x = torch.randn(x_shape)
        w = torch.randn(w_shape)
        if op == "aten::_weight_int8pack_mm":
            x = x.bfloat16()
            w = (w * 10).to(torch.int8)
            s = torch.rand(w.shape[0], dtype=torch.bfloat16)
            fn = lambda: torch._weight_int8pack_mm(x, w, s)  # noqa: E731
        else:
            fn = lambda: torch.mm(x, w)  # noqa: E731
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        total += (time.perf_counter() - start) / repeats * per_step
    return total * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, max_num_seqs=64, max_model_len=512)
    results = {"model": args.model, "dtype": args.dtype, "quantization": args.quantization,
               "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "runs": []}
    for batch in (int(b) for b in args.batch.split(",")):
        run = decode_profile(llm, batch, args.steps, args.prompt_len)
        run["bare_mm_ms_per_step"] = bare_mm(run["linear_calls"])
        results["runs"].append(run)
        print(f"batch {batch}: {run['step_ms']:.2f} ms/step, {run['tokens_per_s']:.0f} tok/s unprofiled; "
              f"profiled {run['profiled_step_ms']:.2f} ms/step (bare mm of the same shapes "
              f"{run['bare_mm_ms_per_step']:.2f} ms)")
        for name, ms in run["breakdown_ms_per_step"].items():
            print(f"  {name:45s} {ms:7.2f} ms  {ms / run['profiled_step_ms']:5.1%}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
