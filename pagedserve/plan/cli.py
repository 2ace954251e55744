"""``pagedserve plan MODEL``: print the plan as a short report, or as JSON."""

from __future__ import annotations

import json
from typing import Any

import click

from pagedserve.plan.gpus import GB, GPUS


@click.command()
@click.argument("model")
@click.option("--gpu", default=None, help=f"A GPU of the table: {', '.join(GPUS)} (default H100).")
@click.option("--device", default="cuda", type=click.Choice(["cuda", "cpu"]), show_default=True,
              help="cpu: size the KV cache by the engine's CPU rule and measure this machine's bandwidth.")
@click.option("--gpu-memory", "gpu_memory_gb", type=float, default=None, help="GB of one GPU (overrides --gpu's).")
@click.option("--bandwidth", "bandwidth_gb_per_s", type=float, default=None, help="GB/s of one GPU's memory.")
@click.option("--price-per-hour", type=float, default=None, help="$ per GPU-hour on demand.")
@click.option("--spot-price-per-hour", type=float, default=None, help="$ per GPU-hour on spot.")
@click.option("--quantization", default=None, type=click.Choice(["none", "awq", "gptq", "fp8"]),
              help="Weight format (default: the config's own quantization_config, else none).")
@click.option("--kv-cache-dtype", default="auto", type=click.Choice(["auto", "fp8"]), show_default=True)
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              show_default=True)
@click.option("--max-model-len", type=int, default=None, help="Default: the model's context length.")
@click.option("--tensor-parallel-size", "-tp", type=int, default=1, show_default=True)
@click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True)
@click.option("--max-num-seqs", type=int, default=256, show_default=True)
@click.option("--max-num-batched-tokens", type=int, default=None)
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--input-len", type=int, default=None,
              help="Workload: prompt tokens a request (default 1024, or half a shorter max_model_len).")
@click.option("--output-len", type=int, default=None,
              help="Workload: output tokens a request (default 256, or a quarter of a shorter max_model_len).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model: str, as_json: bool, **kwargs: Any) -> None:
    """Will MODEL fit, how many requests at once, how fast and at what cost (no weights needed).

    MODEL is a model folder, a config.json, or a built-in shape (Llama-3.1-8B, Llama-3.1-70B,
    Mistral-7B). The KV cache is sized by the engine's own code and the speed is the memory
    roofline `bench throughput` reports: upper bounds on decode speed, lower bounds on cost.
    """
    from pagedserve.core.loader import ModelLoadError
    from pagedserve.plan.estimate import PlanRequest, make_plan

    try:
        result = make_plan(PlanRequest(model=model, **kwargs))
    except (ValueError, ModelLoadError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, indent=2) if as_json else format_plan(result))


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB"


def format_plan(plan: dict[str, Any]) -> str:
    tp = plan["tensor_parallel_size"]
    per_gpu = " a GPU" if tp > 1 else ""
    device = plan["gpu"] or ("CPU" if plan["device"] == "cpu" else "GPU")
    memory = f"{_gb(plan['gpu_memory_bytes'])}, " if plan["gpu_memory_bytes"] else ""
    lines = [
        f"{plan['model']} ({plan['architecture']}, {plan['num_parameters'] / 1e9:.2f} B parameters) "
        f"on {tp} x {device} ({memory}{plan['bandwidth_gb_per_s']:.0f} GB/s, {plan['bandwidth_source']})",
        f"  weights              {_gb(plan['weight_bytes'])}{per_gpu}  "
        f"({plan['dtype']}, quantization {plan['quantization'] or 'none'})",
    ]
    if plan["activation_reserve_bytes"] is not None:
        lines.append(f"  activation reserve   {_gb(plan['activation_reserve_bytes'])}{per_gpu}  "
                     f"(estimated: one layer over max_num_batched_tokens={plan['max_num_batched_tokens']}, "
                     f"the logits of max_num_seqs={plan['max_num_seqs']} rows; the engine measures it)")
    lines += [
        f"  KV bytes per token   {plan['kv_bytes_per_token']}{per_gpu}  (kv_cache_dtype {plan['kv_cache_dtype']})",
        f"  KV cache             {_gb(plan['kv_cache_bytes'])}{per_gpu} = {plan['num_kv_blocks']} blocks = "
        f"{plan['kv_tokens']} tokens",
        f"  max concurrency      {plan['max_concurrency_at_max_model_len']:.2f}x at max_model_len="
        f"{plan['max_model_len']}, {plan['max_concurrency_at_workload_len']} requests of "
        f"{plan['input_len']} + {plan['output_len']} tokens",
    ]
    if not plan["fits"]:
        lines.append(f"  DOES NOT FIT: {plan['why_not']}")
        changes = plan.get("changes_that_fit") or []
        if changes:
            lines.append("  changes that make it fit (smallest first):")
            lines += [f"    {c['change']}: {c['kv_tokens']} KV tokens, "
                      f"{c['max_concurrency_at_max_model_len']:.2f}x at max_model_len" for c in changes]
        else:
            lines.append("  no single change of the plan's options makes it fit")
    else:
        lines.append("  fits")
    rates = plan["decode_tokens_per_s"]
    if rates:
        lines.append(
            f"  decode tokens/s      <= {rates['memory_roofline_batch_1']:.0f} at batch 1, <= "
            f"{rates['memory_roofline_full_concurrency']:.0f} at batch {plan['batch_at_full_concurrency']} "
            "(memory roofline)"
        )
        if rates["compute_ceiling"]:
            lines.append(f"  compute ceiling      {rates['compute_ceiling']:.0f} tokens/s")
    costs = plan["cost_per_million_output_tokens"]
    if costs:
        lines.append("  $ per 1M output      " + ", ".join(f">= ${v:.3f} {k.replace('_', '-')}" for k, v in costs.items()))
    return "\n".join(lines)
