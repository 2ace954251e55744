"""What an engine step costs outside the model forward (issue 22): the engine's steady decode at
a batch size, each part of ``LLMEngine.step`` timed by wrapping it from outside (the engine is
not changed for it):

- ``schedule`` and ``update_from_output``: the scheduler;
- ``forward``: the runner's own timer (the model and the sampled rows' logits);
- ``sampler``: the runner's sampler call;
- ``runner, rest``: ``execute`` less those two (the runner's input preparation and its
  output dicts);
- ``step_finished hooks``: the plugins' hooks (``--metrics`` registers the server's
  Prometheus metrics, as ``pagedserve serve`` does);
- ``engine, rest``: what is left of ``step``: output processing (detokenization, stop strings,
  logprobs, the requests' outputs), timings and stats.

Each configuration runs ``--steps`` decode steps after every request is prefilled, and the
per-part medians over the steps are reported (ms and share of the step).

``--clock thread`` times with the calling thread's CPU time instead of the wall clock: with
``--threads 1`` every part runs on that thread, so the figures hold on a loaded machine too
(the wall clock there counts the time the process waited for a core).

Usage: python benchmarks/step_overhead.py MODEL [--batch 1,64] [--steps 64] [--metrics]
       [--dtype float32] [--threads N] [--clock wall|thread] [--compilation-config JSON] [--output-json FILE]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pagedserve import SamplingParams
from pagedserve.bench.report import git_commit
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.engine import LLMEngine

PARTS = ("forward", "schedule", "runner, rest", "sampler", "update_from_output", "step_finished hooks",
         "engine, rest")


class Clock:
    """Seconds spent in each wrapped callable during the current step."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.seconds: collections.Counter[str] = collections.Counter()
        self.forward = 0.0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += self.now() - start

        return timed


class TimedSampler:
    """The runner's sampler with its calls timed (its other attributes passed through)."""

    def __init__(self, sampler: Any, clock: Clock) -> None:
        self._sampler, self._call = sampler, clock.wrap("sampler", sampler.__call__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


def instrument(engine: LLMEngine, clock: Clock) -> None:
    scheduler, runner = engine.scheduler, engine.runner
    scheduler.schedule = clock.wrap("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.update_from_output = clock.wrap("update_from_output", scheduler.update_from_output)  # type: ignore[method-assign]
    execute = clock.wrap("execute", runner.execute)

    def execute_noting_forward(*args: Any, **kwargs: Any) -> Any:
        """The runner's own forward timer reads the wall clock: with the thread clock, the
        forward is timed here instead, as ``execute`` less the sampler less the rest (the
        runner's input preparation then counts as forward)."""
        if clock.now is time.perf_counter:
            output = execute(*args, **kwargs)
            clock.forward += output.forward_seconds
            return output
        sampler_before, start = clock.seconds["sampler"], clock.now()
        output = execute(*args, **kwargs)
        clock.forward += clock.now() - start - (clock.seconds["sampler"] - sampler_before)
        return output

    runner.execute = execute_noting_forward  # type: ignore[method-assign]
    runner.sampler = TimedSampler(runner.sampler, clock)  # type: ignore[attr-defined]
    hook = engine.plugins.hook
    hook.step_finished = clock.wrap("step_finished hooks", hook.step_finished)


def steady_decode(engine: LLMEngine, clock: Clock, batch: int, steps: int, prompt_len: int) -> dict[str, Any]:
    """Every request prefilled first, then ``steps`` decode steps timed one by one."""
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        ids = [(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(prompt_len)]
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        engine.step()
    for _ in range(4):
        engine.step()
    per_step: list[dict[str, float]] = []
    for _ in range(steps):
        clock.seconds.clear()
        clock.forward = 0.0
        start = clock.now()
        engine.step()
        wall = clock.now() - start
        s = clock.seconds
        parts = {
            "forward": clock.forward,
            "schedule": s["schedule"],
            "sampler": s["sampler"],
            "runner, rest": s["execute"] - clock.forward - s["sampler"],
            "update_from_output": s["update_from_output"],
            "step_finished hooks": s["step_finished hooks"],
        }
        parts["engine, rest"] = wall - sum(parts.values())
        parts["step"] = wall
        per_step.append(parts)
    engine.abort_request([f"r{i}" for i in range(batch)])
    medians = {name: statistics.median(p[name] for p in per_step) for name in (*PARTS, "step")}
    outside = statistics.median(p["step"] - p["forward"] for p in per_step)
    return {
        "batch": batch,
        "steps": steps,
        "median_ms": {k: v * 1e3 for k, v in medians.items()},
        "median_outside_forward_ms": outside * 1e3,
        "outside_forward_share": outside / medians["step"],
        "decode_tokens_per_s": batch / medians["step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--metrics", action="store_true", help="register the server's Prometheus metrics")
    parser.add_argument("--compilation-config", type=json.loads, default=None,
                        help="the engine's compilation_config, JSON (e.g. 3 for -O3)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall clock, or this thread's CPU time (with --threads 1, for a loaded machine)")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine(engine_config_from_args(args.model, dtype=args.dtype, max_num_seqs=64, max_model_len=512,
                                               compilation_config=args.compilation_config))
    if args.metrics:
        from pagedserve.core.metrics import EngineMetrics

        engine.plugins.pm.register(EngineMetrics("bench"))
    clock = Clock(time.thread_time if args.clock == "thread" else time.perf_counter)
    instrument(engine, clock)
    results = {
        "commit": git_commit(), "model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "metrics": args.metrics, "clock": args.clock, "compilation_config": args.compilation_config,
        "load_average_before": os.getloadavg()[0], "runs": [],
    }
    for batch in (int(b) for b in args.batch.split(",")):
        run = steady_decode(engine, clock, batch, args.steps, args.prompt_len)
        run["load_average"] = os.getloadavg()[0]
        results["runs"].append(run)
        cells = ", ".join(f"{k} {v:.3f}" for k, v in run["median_ms"].items())
        print(f"batch {batch}: {cells} ms; outside the forward {run['median_outside_forward_ms']:.3f} ms "
              f"({run['outside_forward_share']:.0%}); load {run['load_average']:.1f}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
