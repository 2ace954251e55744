"""speculative_config: vLLM's names, and clear errors for bad or unsupported values."""

from __future__ import annotations

import pytest

from pagedserve.core.config import ConfigError, SpeculativeConfig, engine_config_from_args


def test_dict_json_and_defaults() -> None:
    config = engine_config_from_args(
        "m", speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    )
    spec = config.speculative
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == (
        "ngram", 4, 1, 4
    )
    parsed = SpeculativeConfig.from_value('{"method": "draft_model", "model": "x", "num_speculative_tokens": 2}')
    assert (parsed.method, parsed.model) == ("draft_model", "x")
    assert engine_config_from_args("m").speculative is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "in \\[1, 16\\]"),
        ({"num_speculative_tokens": 2}, "needs a 'method'"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_maxx": 3}, "did you mean 'prompt_lookup_max'"),
        ({"method": "ngram", "num_speculative_tokens": 2, "speculative_token_tree": "[]"}, "not supported"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "must not exceed"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "drop model"),
        ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": -1}, "disable_by_batch_size"),
        ({"method": "draft_model", "num_speculative_tokens": 2, "draft_confidence_threshold": 1.5},
         "draft_confidence_threshold must be in \\[0, 1\\]"),
        ({"method": "draft_model", "num_speculative_tokens": 2, "enforce_eager": "yes"},
         "enforce_eager must be true or false"),
        ({"method": "ngram", "num_speculative_tokens": 2, "enforce_eager": True}, "runs no model: drop it"),
        ("{not json", "not valid JSON"),
        (["ngram"], "must be a dict"),
    ],
)
def test_bad_values_say_what_to_change(value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        engine_config_from_args("m", speculative_config=value)


def test_spec_decode_metrics_count_each_step() -> None:
    from pagedserve.core.step_stats import StepStats
    from pagedserve.core.metrics import EngineMetrics
    from pagedserve.core.speculative import SpecDecodingStats

    metrics = EngineMetrics("tiny")
    stats = SpecDecodingStats()
    stats.observe(4, 2)
    stats.observe(3, 3)
    step = StepStats(0, 0, 0, 0.0, 0, 0.0, 0.0, spec_decoding=stats)
    metrics.step_finished(step)
    metrics.step_finished(step)

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(f"pagedserve:{name}", {"model_name": "tiny", **labels})

    assert value("spec_decode_num_drafts_total") == 4
    assert value("spec_decode_num_draft_tokens_total") == 14
    assert value("spec_decode_num_accepted_tokens_total") == 10
    per_pos = [value("spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(3)]
    assert per_pos == [4, 4, 2]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["latency", "throughput"])
def test_bench_commands_with_speculative_config(tiny_model, tmp_path, command: str) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "result.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 0}'
    args = (
        ["--workload", "random", "--input-len", "12", "--output-len", "8", "--num-iters", "1", "--batch-size", "1,2"]
        if command == "latency"
        else ["--num-prompts", "3", "--lengths", "fixed:12,8"]
    )
    subprocess.run(
        [sys.executable, "-m", "pagedserve", "--log-level", "WARNING", "bench", command, "--model",
         str(tiny_model()), "--dtype", "float32", "--max-num-batched-tokens", "256", "--speculative-config", spec,
         *args, "--output-json", str(out)],
        check=True, capture_output=True, text=True,
    )
    results = json.loads(out.read_text())["results"]
    if command == "latency":
        assert set(results) >= {"plain_batch_1", "speculative_batch_1", "speedup_batch_2"}
        assert results["speedup_batch_1"] == pytest.approx(
            results["speculative_batch_1"]["output_tokens_per_s"] / results["plain_batch_1"]["output_tokens_per_s"]
        )
    else:
        assert results["speedup_vs_no_speculation"] == pytest.approx(
            results["output_tokens_per_s"] / results["no_speculation_output_tokens_per_s"]
        )
