"""``bench throughput --num-loras``: its adapters and merged models are what they claim (a merged
model generates what the adapter does), and the run reports every figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.bench.lora import make_random_adapters, merge_adapter, run_lora_benchmark
from pagedserve.bench.workload import make_workload

pytestmark = pytest.mark.slow


def test_a_merged_adapter_generates_what_the_adapter_does(tiny_model, tmp_path: Path) -> None:
    model = str(tiny_model())
    (adapter,) = make_random_adapters(model, tmp_path / "adapters", 1, rank=4, seed=3)
    # Stronger than the benchmark's, so the adapter changes the tokens.
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 4000
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    merged = merge_adapter(model, adapter, tmp_path / "merged")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = [{"prompt_token_ids": [0, *range(5, 25)]}]
    with_lora = LLM(model, dtype="float32", enable_lora=True, max_lora_rank=4)
    lora_tokens = with_lora.generate(prompt, params, lora_request=LoRARequest("a", 1, str(adapter)), use_tqdm=False)
    base_tokens = with_lora.generate(prompt, params, use_tqdm=False)
    merged_tokens = LLM(str(merged), dtype="float32").generate(prompt, params, use_tqdm=False)
    assert lora_tokens[0].outputs[0].token_ids == merged_tokens[0].outputs[0].token_ids
    assert lora_tokens[0].outputs[0].token_ids != base_tokens[0].outputs[0].token_ids


def test_lora_benchmark_reports_every_figure(tiny_model) -> None:
    model = str(tiny_model())
    workload = make_workload("fixed:12,4", 4, 512, 512, 0)
    results = run_lora_benchmark(model, {"dtype": "float32", "max_num_seqs": 4}, workload, [1, 2], 4, True)
    for key in ("base_output_tokens_per_s", "loras_1_vs_base", "loras_2_vs_base",
                "merged_2_sequential_output_tokens_per_s", "loras_2_vs_merged_sequential"):
        assert results[key] > 0, key
    assert results["loras_2_mean_batch_size"] == 4  # two adapters share every step
