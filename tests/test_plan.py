"""``pagedserve plan``: the memory table of well-known shapes, the advice when a model does not
fit, and the plan of a CPU engine checked against the engine and ``bench throughput`` run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pagedserve.cli import cli
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.engine import LLMEngine
from pagedserve.core.plugins import get_plugin_manager
from pagedserve.plan.estimate import PlanRequest, make_plan
from pagedserve.plan.gpus import GB, GPUS

get_plugin_manager().hook.register_commands(cli=cli)


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# The seeds' table: FP16 about 2 bytes a parameter, 4 bits about a quarter of that plus scales.
@pytest.mark.parametrize(
    ("model", "quantization", "low_gb", "high_gb"),
    [
        ("Mistral-7B", None, 14, 14),
        ("Mistral-7B", "awq", 4, 6),
        ("Mistral-7B", "gptq", 4, 6),
        ("Llama-3.1-70B", None, 140, 140),
        ("Llama-3.1-8B", None, 16, 16),
    ],
)
def test_weights_of_well_known_shapes_match_the_seeds_table(model, quantization, low_gb, high_gb) -> None:
    plan = make_plan(PlanRequest(model, quantization=quantization, max_model_len=4096))
    assert 0.9 * low_gb <= plan["weight_bytes_total"] / GB <= 1.1 * high_gb


def test_kv_bytes_per_token_from_the_config() -> None:
    # Llama 3.1 70B: 80 layers x (K, V) x 8 KV heads x 128 x 2 bytes; FP8 halves it.
    assert make_plan(PlanRequest("Llama-3.1-70B", gpu="H200", quantization="awq"))["kv_bytes_per_token"] == 327680
    fp8 = make_plan(PlanRequest("Llama-3.1-70B", gpu="H200", quantization="awq", kv_cache_dtype="fp8"))
    assert fp8["kv_bytes_per_token"] == 327680 // 2


def test_a_model_that_does_not_fit_gets_the_changes_that_make_it_fit() -> None:
    request = PlanRequest("Llama-3.1-70B", gpu="H100", max_model_len=8192)
    plan = make_plan(request)
    assert not plan["fits"] and plan["decode_tokens_per_s"] is None and "weights" in plan["why_not"]
    changes = [c["change"] for c in plan["changes_that_fit"]]
    assert any(c.startswith("--quantization") for c in changes)
    assert any(c.startswith("--tensor-parallel-size") for c in changes)
    assert "--gpu H200" not in changes  # 141 GB of weights do not fit in 141 GB
    # Each suggestion fits when planned, and the TP suggestion is the smallest TP that does.
    tp = int(next(c for c in changes if c.startswith("--tensor")).split()[1])
    assert make_plan(PlanRequest("Llama-3.1-70B", gpu="H100", max_model_len=8192, tensor_parallel_size=tp))["fits"]
    smaller = PlanRequest("Llama-3.1-70B", gpu="H100", max_model_len=8192, tensor_parallel_size=tp // 2)
    assert not make_plan(smaller)["fits"]


def test_tensor_parallelism_splits_weights_and_kv_heads() -> None:
    one = make_plan(PlanRequest("Llama-3.1-8B", gpu="A100-80GB", max_model_len=8192))
    two = make_plan(PlanRequest("Llama-3.1-8B", gpu="A100-80GB", max_model_len=8192, tensor_parallel_size=2))
    assert two["kv_bytes_per_token"] * 2 == one["kv_bytes_per_token"]
    assert 0.49 < two["weight_bytes"] / one["weight_bytes"] < 0.51
    assert two["kv_tokens"] > 2 * one["kv_tokens"]


def test_decode_bounds_and_costs_follow_the_roofline() -> None:
    plan = make_plan(PlanRequest("Mistral-7B", gpu="L40S", max_model_len=8192, input_len=512, output_len=128))
    rates, gpu = plan["decode_tokens_per_s"], GPUS["L40S"]
    # Batch 1: weights + one sequence's K/V at its mean context (512 + 64) per token.
    per_token = plan["weight_bytes"] + 576 * plan["kv_bytes_per_token"]
    assert rates["memory_roofline_batch_1"] == pytest.approx(gpu.bandwidth_gb_per_s * GB / per_token)
    assert rates["memory_roofline_full_concurrency"] > 10 * rates["memory_roofline_batch_1"]
    assert plan["batch_at_full_concurrency"] == min(256, plan["max_concurrency_at_workload_len"])
    tokens_per_s = min(rates["memory_roofline_full_concurrency"], rates["compute_ceiling"])
    costs = plan["cost_per_million_output_tokens"]
    assert costs["on_demand"] == pytest.approx(gpu.price_per_hour / (tokens_per_s * 3600) * 1e6)
    assert costs["spot"] < costs["on_demand"]


def test_plan_command_text_json_and_a_bare_config(tmp_path: Path) -> None:
    text = run_cli("plan", "Mistral-7B", "--gpu", "l4", "--quantization", "awq", "--max-model-len", "8192")
    assert "fits" in text and "KV cache" in text and "$ per 1M output" in text
    config = tmp_path / "config.json"
    from pagedserve.plan.shapes import BUILTIN_SHAPES

    config.write_text(json.dumps(BUILTIN_SHAPES["mistralai/Mistral-7B-v0.1"]))
    args = ["--gpu-memory", "48", "--bandwidth", "864", "--price-per-hour", "2", "--max-model-len", "8192", "--json"]
    from_file = json.loads(run_cli("plan", str(config), *args))
    builtin = json.loads(run_cli("plan", "mistralai/Mistral-7B-v0.1", *args))
    assert from_file["kv_tokens"] == builtin["kv_tokens"] > 0
    promised = {"weight_bytes", "kv_bytes_per_token", "kv_tokens", "max_concurrency_at_max_model_len",
                "max_concurrency_at_workload_len", "fits", "decode_tokens_per_s", "cost_per_million_output_tokens"}
    assert promised <= set(builtin) and set(builtin["decode_tokens_per_s"]) >= {
        "memory_roofline_batch_1", "memory_roofline_full_concurrency"}
    assert from_file["bandwidth_source"] == "given" and set(from_file["cost_per_million_output_tokens"]) == {"on_demand"}


def test_a_quantized_config_is_planned_as_the_checkpoint_quantize_makes(tmp_path: Path) -> None:
    from pagedserve.plan.estimate import QUANTIZED_CHECKPOINTS
    from pagedserve.plan.shapes import BUILTIN_SHAPES

    config = tmp_path / "config.json"
    values = {**BUILTIN_SHAPES["mistralai/Mistral-7B-v0.1"], "quantization_config": QUANTIZED_CHECKPOINTS["awq"]}
    config.write_text(json.dumps(values))
    checkpoint = make_plan(PlanRequest(str(config), max_model_len=4096))
    forced = make_plan(PlanRequest("Mistral-7B", quantization="awq", max_model_len=4096))
    assert checkpoint["quantization"] == forced["quantization"] == "awq"
    assert checkpoint["weight_bytes"] == forced["weight_bytes"] and checkpoint["num_parameters"] == forced["num_parameters"]


def test_plan_command_refuses_bad_input() -> None:
    for args, message in [
        (["plan", "no-such-model"], "built-in shape"),
        (["plan", "Mistral-7B", "--gpu", "B300"], "unknown GPU"),
        (["plan", "Mistral-7B", "--gpu-memory", "24"], "--bandwidth"),
        (["plan", "Mistral-7B", "--device", "cpu", "--gpu", "L4"], "--device cpu"),
        (["plan", "Mistral-7B", "--device", "cpu", "--kv-cache-dtype", "fp8", "--bandwidth", "9"], "reference backend"),
        (["plan", "Mistral-7B", "--max-model-len", "1000000"], "max_model_len"),
        (["plan", "Mistral-7B", "--max-model-len", "1024", "--input-len", "1000", "--output-len", "100"], "workload"),
    ]:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and message in result.output, result.output


@pytest.mark.slow
def test_cpu_plan_predicts_the_engine_and_bench_throughput(tmp_path: Path) -> None:
    """The bundled model on the CPU: the plan's KV capacity is the engine's, and its roofline at
    the workload is within 25% of the roofline ``bench throughput`` reports for that workload."""
    output = tmp_path / "bench.json"
    small = ["--max-num-seqs", "8", "--max-num-batched-tokens", "256"]  # a cheap warm-up
    run_cli("bench", "throughput", "--num-prompts", "8", "--lengths", "fixed:32,16", *small, "--output-json", str(output))
    bench = json.loads(output.read_text())["results"]
    plan = json.loads(run_cli(
        "plan", "pagedserve/tiny-py", "--device", "cpu", *small, "--input-len", "32",
        "--output-len", "16", "--bandwidth", str(bench["copy_bandwidth_gb_per_s"]), "--json",
    ))
    assert plan["kv_tokens"] == bench["kv_capacity_tokens"]
    assert plan["kv_bytes_per_token"] == bench["kv_bytes_per_token"]
    assert plan["weight_bytes"] == bench["weight_bytes"]
    assert plan["batch_at_full_concurrency"] == 8
    predicted = plan["decode_tokens_per_s"]["memory_roofline_full_concurrency"]
    assert predicted == pytest.approx(bench["roofline_output_tokens_per_s"], rel=0.25)
    # The engine's own sizing with other settings: what the plan predicts, block for block.
    engine = LLMEngine(engine_config_from_args(
        "pagedserve/tiny-py", max_model_len=256, max_num_seqs=12, block_size=8, max_num_batched_tokens=64))
    other = make_plan(PlanRequest("pagedserve/tiny-py", device="cpu", max_model_len=256, max_num_seqs=12,
                                  block_size=8, bandwidth_gb_per_s=1.0))
    assert other["num_kv_blocks"] == engine.runner.num_kv_blocks
