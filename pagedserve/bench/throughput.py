"""Offline throughput: the engine in-process on a workload, with its step statistics, the KV-cache
waste against a contiguous preallocation, and the engine's overhead over the model forward."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from pagedserve.bench.roofline import StepWork, roofline
from pagedserve.bench.workload import BenchRequest
from pagedserve.core.engine import LLMEngine
from pagedserve.core.hookspecs import hookimpl
from pagedserve.core.lora import LoRARequest
from pagedserve.core.model_runner import ModelRunner
from pagedserve.core.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.core.step_stats import StepStats


@dataclass(eq=False)  # identity: pluggy refuses a plugin equal to one already registered
class StepRecorder:
    """A plugin, registered for one run, that keeps every step's stats and samples the KV cache:
    slots allocated to running requests against slots holding a token."""

    engine: LLMEngine
    steps: list[StepStats] = field(default_factory=list)
    work: list[StepWork] = field(default_factory=list)
    slots_allocated: int = 0
    slots_contiguous: int = 0

    @hookimpl
    def step_finished(self, stats: StepStats) -> None:
        self.steps.append(stats)
        running = self.engine.scheduler.running
        blocks = {block for request in running for block in request.block_ids}
        self.slots_allocated += len(blocks) * self.engine.config.cache.block_size
        filled = sum(request.num_computed_tokens for request in running)  # the keys attended
        self.work.append(StepWork(stats.num_scheduled_tokens, stats.num_generation_tokens, filled))
        self.slots_contiguous += len(running) * self.engine.max_model_len


def run_throughput(
    engine: LLMEngine,
    workload: list[BenchRequest],
    lora_requests: list[LoRARequest | None] | None = None,
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
) -> dict[str, Any]:
    """Generate every request of ``workload`` (greedy, ``ignore_eos`` so lengths are exact),
    request i with ``lora_requests[i]`` when given, reading outputs as ``output_kind``
    (FINAL_ONLY, as ``LLM.generate`` does)."""
    recorder = StepRecorder(engine)
    name = f"bench-recorder-{id(recorder)}"
    engine.plugins.pm.register(recorder, name=name)
    try:
        start = time.perf_counter()
        for i, request in enumerate(workload):
            params = SamplingParams(
                temperature=0.0, max_tokens=request.output_len, ignore_eos=True, output_kind=output_kind
            )
            lora = lora_requests[i] if lora_requests else None
            engine.add_request(f"bench-{i}", {"prompt_token_ids": request.prompt_token_ids}, params, lora_request=lora)
        output_tokens = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished or output_kind is RequestOutputKind.DELTA:
                    output_tokens += len(output.outputs[0].token_ids)
        elapsed = time.perf_counter() - start
    finally:
        engine.plugins.pm.unregister(name=name)
    return summarize(engine, workload, recorder, elapsed, output_tokens)


def summarize(
    engine: LLMEngine,
    workload: list[BenchRequest],
    recorder: StepRecorder,
    elapsed: float,
    output_tokens: int,
) -> dict[str, Any]:
    steps = recorder.steps
    slots_filled = sum(step.kv_tokens for step in recorder.work)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in workload)
    overheads = [(s.step_seconds - s.forward_seconds) / s.forward_seconds for s in steps if s.forward_seconds > 0]
    block_size = engine.config.cache.block_size
    capacity = engine.kv_cache.num_blocks * block_size
    mean_request_slots = statistics.mean(-(-r.total_len // block_size) * block_size for r in workload)
    results = {
        "num_requests": len(workload),
        "elapsed_s": elapsed,
        "requests_per_s": len(workload) / elapsed,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "num_steps": len(steps),
        "mean_batch_size": statistics.mean(s.num_scheduled_seqs for s in steps),
        "mean_kv_cache_usage": statistics.mean(s.kv_cache_usage for s in steps),
        "kv_waste_paged": 1 - slots_filled / recorder.slots_allocated,
        "kv_waste_contiguous": 1 - slots_filled / recorder.slots_contiguous,
        "kv_capacity_tokens": capacity,
        "max_concurrency_paged": int(capacity // mean_request_slots),
        "max_concurrency_contiguous": capacity // engine.max_model_len,
        "median_step_overhead": statistics.median(overheads),
        "num_preemptions": sum(s.num_preemptions for s in steps),
    }
    spec_steps = [s.spec_decoding for s in steps if s.spec_decoding is not None]
    drafts = sum(s.num_drafts for s in spec_steps)
    if drafts:
        accepted = sum(s.num_accepted_tokens for s in spec_steps)
        results["spec_mean_accepted_length"] = 1 + accepted / drafts
        results["spec_acceptance_rate"] = accepted / sum(s.num_draft_tokens for s in spec_steps)
    world = engine.config.parallel.tensor_parallel_size
    if world > 1 and steps:
        results["tensor_parallel"] = communication(engine, steps, world)
    if isinstance(engine.runner, ModelRunner):
        # Each step attends over the whole context of each running request: what they hold after
        # it (requests that finished in the step not counted, so the bound errs fast).
        bound = roofline(engine.runner, recorder.work, output_tokens)
        results.update(bound, fraction_of_roofline=bound["roofline_seconds"] / elapsed)
        if "bound_seconds" in bound:
            results["fraction_of_bound"] = bound["bound_seconds"] / elapsed
    return results


def compare_output_kinds(engine: LLMEngine, workload: list[BenchRequest], rounds: int = 2) -> dict[str, Any]:
    """The engine's overhead over the forward with each output kind, on the same workload in
    one run: CUMULATIVE copies every running request's token ids each step (what every step
    did before output kinds), DELTA only the new ones, FINAL_ONLY nothing until the end. The
    kinds take turns for ``rounds`` rounds and each keeps its best round (the least disturbed
    by other load); the overhead is per decode step (one token for every running request), in
    seconds and over the forward."""
    best: dict[RequestOutputKind, dict[str, float]] = {}
    for _ in range(rounds):
        for kind in RequestOutputKind:
            recorder_steps = _decode_step_overheads(engine, workload, kind)
            if kind not in best or recorder_steps["seconds"] < best[kind]["seconds"]:
                best[kind] = recorder_steps
    results: dict[str, Any] = {}
    for kind, figures in best.items():
        name = kind.name.lower()
        results[f"{name}_decode_step_overhead_ms"] = figures["seconds"] * 1e3
        results[f"{name}_decode_step_overhead"] = figures["ratio"]
    cumulative = best[RequestOutputKind.CUMULATIVE]["seconds"]
    results["delta_vs_cumulative_overhead"] = best[RequestOutputKind.DELTA]["seconds"] / cumulative
    results["final_only_vs_cumulative_overhead"] = best[RequestOutputKind.FINAL_ONLY]["seconds"] / cumulative
    return results


def _decode_step_overheads(engine: LLMEngine, workload: list[BenchRequest], kind: RequestOutputKind) -> dict[str, float]:
    """Median (step - forward) seconds and its ratio to the forward over the run's decode steps."""
    recorder = StepRecorder(engine)
    name = f"bench-kinds-{id(recorder)}"
    engine.plugins.pm.register(recorder, name=name)
    try:
        run_throughput(engine, workload, output_kind=kind)
    finally:
        engine.plugins.pm.unregister(name=name)
    decode = [s for s in recorder.steps if s.num_prompt_tokens == 0 and s.num_scheduled_tokens == s.num_scheduled_seqs]
    steps = decode or recorder.steps
    return {
        "seconds": statistics.median(s.step_seconds - s.forward_seconds for s in steps),
        "ratio": statistics.median((s.step_seconds - s.forward_seconds) / s.forward_seconds for s in steps),
    }


def communication(engine: LLMEngine, steps: list[StepStats], world: int) -> dict[str, float]:
    """The mean bytes a step moved between the ranks, from the model's shape and each step's
    tokens and sampled rows (``distributed.communication``)."""
    from pagedserve.distributed.communication import bytes_per_step

    hf_config = engine.config.model.hf_config
    dtype_bytes = engine.runner.dtype.itemsize  # type: ignore[attr-defined]
    figures = [bytes_per_step(hf_config, world, s.num_scheduled_tokens, s.num_generation_tokens, dtype_bytes) for s in steps]
    mean = {key: statistics.mean(f[key] for f in figures) for key in figures[0]}
    return {"size": world, **{f"mean_{key}_per_step": value for key, value in mean.items()}}
