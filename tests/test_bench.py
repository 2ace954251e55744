"""The benchmark commands: workloads, the offline throughput run with its KV accounting, the
transformers baselines and the load generator against a real server (small sizes: these test
that the figures are computed right, not how fast anything is)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.bench.roofline import StepWork, bound_seconds, flops_per_token
from pagedserve.bench.serve import run_load
from pagedserve.bench.throughput import run_throughput
from pagedserve.bench.workload import length_pairs, make_workload, with_fresh_ids
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.engine import LLMEngine

from server_process import API_KEY, ENGINE_ARGS, shared_server


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        ("fixed:10,5", lambda pairs: set(pairs) == {(10, 5)}),
        ("uniform:4-8,1-3", lambda pairs: all(4 <= i <= 8 and 1 <= o <= 3 for i, o in pairs)),
        ("sharegpt", lambda pairs: len({i for i, _ in pairs}) > 10 and all(i + o <= 256 for i, o in pairs)),
    ],
)
def test_length_distributions(spec: str, check) -> None:
    pairs = length_pairs(spec, 50, 256, random.Random(0))
    assert len(pairs) == 50 and check(pairs)
    assert pairs == length_pairs(spec, 50, 256, random.Random(0))


def test_lengths_are_clipped_to_the_context_and_bad_specs_refused() -> None:
    assert length_pairs("fixed:300,100", 1, 256, random.Random(0)) == [(255, 1)]
    with pytest.raises(ValueError, match="unknown length distribution"):
        length_pairs("zipf", 1, 256, random.Random(0))


def test_workload_uses_ordinary_token_ids() -> None:
    workload = make_workload("fixed:20,4", 5, vocab_size=50, max_model_len=64)
    assert all(3 <= t < 50 for r in workload for t in r.prompt_token_ids)
    assert [r.total_len for r in workload] == [24] * 5


@pytest.mark.slow
def test_throughput_counts_tokens_and_kv_waste(tiny_model) -> None:
    engine = LLMEngine(engine_config_from_args(str(tiny_model()), dtype="float32", max_model_len=128, block_size=16))
    workload = make_workload("uniform:5-40,3-20", 12, engine.vocab_size, engine.max_model_len, seed=1)
    results = run_throughput(engine, workload)
    assert results["output_tokens"] == sum(r.output_len for r in workload)
    assert results["num_requests"] == 12 and results["num_steps"] >= max(r.output_len for r in workload)
    assert 1 <= results["mean_batch_size"] <= 12
    # Paged: at most one partly filled block per request; contiguous: max_model_len each.
    assert 0 <= results["kv_waste_paged"] < results["kv_waste_contiguous"] < 1
    assert results["max_concurrency_paged"] > results["max_concurrency_contiguous"]
    assert results["median_step_overhead"] >= 0
    assert not engine.has_unfinished_requests() and engine.kv_cache.num_used_blocks == 0
    # The memory roofline: 2 layers x (K, V) x 2 KV heads x head size 16 x 4 bytes per token;
    # the weights as transformers counts them, plus the rotary cache.
    assert results["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    hf = AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32)
    rotary = engine.runner.model.model.layers[0].self_attn.rotary_emb.cos_sin_cache
    assert results["weight_bytes"] == 4 * hf.num_parameters() + rotary.numel() * 4
    assert results["copy_bandwidth_gb_per_s"] > 0
    expected = (results["num_steps"] * results["weight_bytes"] + results["kv_tokens_read"] * results["kv_bytes_per_token"]) / (
        results["copy_bandwidth_gb_per_s"] * 1e9
    )
    assert results["roofline_seconds"] == pytest.approx(expected)
    assert results["fraction_of_roofline"] == pytest.approx(expected / results["elapsed_s"])
    # The arithmetic side: every decoder linear weight twice per token (the LM head per sampled
    # token, not counted here), and a step at least as long as either side alone.
    decoder = sum(p.numel() for name, p in hf.named_parameters() if ".layers." in name and name.endswith("proj.weight"))
    assert results["flops_per_token_layers"] == 2 * decoder
    assert results["matmul_peak_gflop_per_s"] > 0
    assert results["bound_seconds"] >= max(results["roofline_seconds"], results["arithmetic_seconds"]) * (1 - 1e-9)
    assert results["bound_seconds"] <= results["roofline_seconds"] + results["arithmetic_seconds"]
    assert results["fraction_of_bound"] == pytest.approx(results["bound_seconds"] / results["elapsed_s"])


def test_bound_takes_each_steps_larger_side() -> None:
    """A decode step of one token is bound by its bytes, a prefill by its FLOPs: the bound is the
    sum of each step's larger side (attention one query per context token)."""
    steps = [StepWork(tokens=1, sampled=1, kv_tokens=10), StepWork(tokens=1000, sampled=2, kv_tokens=1000)]
    flops = (100, 10, 4)  # per token, per sampled token, per context token
    weight_bytes, per_token, bandwidth, peak = 1000, 2, 1000.0, 10_000.0
    arithmetic, total = bound_seconds(steps, weight_bytes, per_token, bandwidth, flops, peak)
    decode_flops, prefill_flops = 100 + 10 + 40, 100_000 + 20 + 4000
    assert arithmetic == pytest.approx((decode_flops + prefill_flops) / peak)
    # decode: memory (1,020 bytes: 1.02 s) over arithmetic (0.015 s); prefill: arithmetic
    # (10.402 s) over memory (3 s).
    assert total == pytest.approx(1020 / bandwidth + prefill_flops / peak)


def test_moe_tokens_cost_their_top_k_experts(tiny_model) -> None:
    folder = tiny_model("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
    engine = LLMEngine(engine_config_from_args(str(folder), dtype="float32", max_model_len=64))
    config = json.loads((folder / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    attention = hidden * head_dim * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])
    per_layer = attention + hidden * 4 + 2 * 3 * inter * hidden  # projections, router, 2 of 4 experts
    layer_flops, head_flops, attention_flops = flops_per_token(engine.runner.model)
    assert layer_flops == 2 * layers * per_layer
    assert head_flops == 2 * config["vocab_size"] * hidden
    assert attention_flops == 4 * layers * config["num_attention_heads"] * head_dim


def test_quantized_weights_have_no_arithmetic_bound(tiny_model) -> None:
    engine = LLMEngine(engine_config_from_args(str(tiny_model()), dtype="float32", max_model_len=64, quantization="int8"))
    assert flops_per_token(engine.runner.model) is None


@pytest.mark.slow
def test_bench_throughput_command_with_hf_baseline(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "pagedserve", "--log-level", "WARNING", "bench", "throughput",
        "--model", str(tiny_model()), "--dtype", "float32", "--num-prompts", "4",
        "--lengths", "fixed:8,4", "--baseline", "hf", "--baseline-dtype", "bfloat16",
        "--warmup-prompts", "2", "--output-json", str(out),
    ]
    printed = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "speedup_vs_hf_sequential" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "throughput" and record["machine"]["device"] == "cpu"
    assert record["settings"]["warmup_prompts"] == 2 and record["settings"]["dtype"] == "float32"
    results = record["results"]
    assert results["hf_dtype"] == "bfloat16"
    assert results["hf_sequential"]["output_tokens"] == results["output_tokens"] == 16
    assert results["hf_static_batches"]["generated_tokens_incl_padding"] == 16
    assert results["speedup_vs_hf_sequential"] == pytest.approx(
        results["output_tokens_per_s"] / results["hf_sequential"]["output_tokens_per_s"]
    )
    assert "rounds" not in results


@pytest.mark.slow
def test_bench_throughput_rounds_take_turns_with_transformers(tiny_model, tmp_path: Path) -> None:
    """--rounds 3: the engine and transformers' generate take turns, the speed-up is the median
    of the three rounds' own ratios."""
    out = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "pagedserve", "--log-level", "WARNING", "bench", "throughput",
        "--model", str(tiny_model()), "--dtype", "float32", "--num-prompts", "4",
        "--lengths", "fixed:8,4", "--baseline", "hf", "--rounds", "3", "--output-json", str(out),
    ]
    subprocess.run(command, capture_output=True, text=True, check=True)
    record = json.loads(out.read_text())
    assert record["settings"]["rounds"] == 3
    rounds = record["results"]["rounds"]
    assert len(rounds) == 3
    assert rounds[0]["output_tokens_per_s"] == record["results"]["output_tokens_per_s"]
    for turn in rounds:
        assert turn["speedup_vs_hf_sequential"] == pytest.approx(
            turn["output_tokens_per_s"] / turn["hf_sequential_output_tokens_per_s"])
    ratios = sorted(turn["speedup_vs_hf_sequential"] for turn in rounds)
    assert record["results"]["speedup_vs_hf_sequential"] == pytest.approx(ratios[1])


def test_bench_rounds_need_the_transformers_baseline(tiny_model) -> None:
    from click.testing import CliRunner

    from pagedserve.bench.cli import bench

    result = CliRunner().invoke(bench, ["throughput", "--model", str(tiny_model()), "--rounds", "2"])
    assert result.exit_code != 0 and "--baseline hf" in result.output


def test_fresh_ids_keep_the_lengths_and_change_the_prompts() -> None:
    workload = make_workload("sharegpt", 16, 4096, 512, seed=0)
    fresh = with_fresh_ids(workload, 7, 4096)
    assert [(len(r.prompt_token_ids), r.output_len) for r in fresh] == [(len(r.prompt_token_ids), r.output_len) for r in workload]
    assert all(a.prompt_token_ids != b.prompt_token_ids for a, b in zip(fresh, workload))
    assert all(3 <= token < 4096 for r in fresh for token in r.prompt_token_ids)


@pytest.mark.slow
def test_load_generator_against_a_real_server(request, tiny_model, tmp_path_factory) -> None:
    server = shared_server(request.config, tiny_model(), tmp_path_factory.mktemp("server"))
    workload = make_workload("fixed:12,6", 8, vocab_size=256, max_model_len=ENGINE_ARGS["max_model_len"])
    results = asyncio.run(run_load(f"{server.url}/v1", workload, max_concurrency=4, api_key=API_KEY))
    assert results["completed"] == 8 and results["failed"] == 0
    assert results["output_tokens"] == 48
    assert 0 < results["ttft_s"]["p50"] <= results["e2e_s"]["p50"]
    assert results["itl_s"]["p99"] >= results["itl_s"]["p50"] > 0
