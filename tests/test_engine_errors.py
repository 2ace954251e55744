"""Every failure a user can cause: a clear exception, nothing leaked, the engine keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.core.config import ConfigError
from pagedserve.core.loader import ModelLoadError
from pagedserve.core.plugins import PluginError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model()), dtype="float32", max_model_len=64, block_size=4, num_kv_blocks=12)


BAD_REQUESTS = [
    ("x " * 100, SamplingParams(), "max_model_len"),
    ("", SamplingParams(), "empty"),
    ({"prompt_token_ids": []}, SamplingParams(), "empty"),
    ({"prompt_token_ids": [1, 2, 99999]}, SamplingParams(), "vocabulary"),
    ({"prompt_token_ids": [1, -3]}, SamplingParams(), "vocabulary"),
    ({"prompt_token_ids": [5] * 40}, SamplingParams(max_tokens=20, ignore_eos=True), "KV"),
    ({"nothing": 1}, SamplingParams(), "prompt_token_ids"),
    (3.5, SamplingParams(), "prompt must be"),
    ("a", SamplingParams(n=10**9), "max_num_seqs"),
    ("a", SamplingParams(stop_token_ids=[10**6]), "vocabulary"),
]


@pytest.mark.parametrize(("prompt", "params", "message"), BAD_REQUESTS)
def test_bad_request_is_rejected_and_the_engine_keeps_serving(llm: LLM, prompt, params, message) -> None:
    engine = llm.engine
    engine.add_request("good", "def main():", SamplingParams(temperature=0.0, max_tokens=6))
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert len(finished[0].outputs[0].token_ids) == 6 or finished[0].outputs[0].finish_reason == "stop"
    assert engine.kv_cache.num_used_blocks == 0


def test_a_bad_prompt_in_a_batch_runs_nothing(llm: LLM) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate(["ok", {"prompt_token_ids": [10**6]}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_used_blocks == 0


def test_duplicate_request_id(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("same", "a", SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("same", "b", SamplingParams(max_tokens=1))
    engine.abort_request("same")
    assert not engine.has_unfinished_requests()


def test_abort_mid_generation_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("long", "def f(x):", SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request("other", "import os", SamplingParams(max_tokens=4, temperature=0.0))
    for _ in range(3):
        engine.step()
    assert engine.kv_cache.num_used_blocks > 0
    engine.abort_request("long")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.num_used_blocks == 0


def test_invalid_sampling_params_name_the_field() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_unknown_architecture_lists_known_ones(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["NoSuchForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PluginError, match="NoSuchForCausalLM.*LlamaForCausalLM"):
        LLM(str(folder))


def test_missing_files(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"))
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model(), folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(str(folder))


def test_pickle_checkpoint_refused(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "pickle"
    shutil.copytree(tiny_model(), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        LLM(str(folder))


def test_bad_engine_arguments_say_what_to_change(tiny_model) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        LLM(str(tiny_model()), block_size=3)
    with pytest.raises(ConfigError, match="did you mean 'max_num_seqs'"):
        LLM(str(tiny_model()), max_num_seq=4)
    with pytest.raises(ConfigError, match="max_model_len"):
        LLM(str(tiny_model()), max_model_len=10**6)


def test_top_k_beyond_the_vocabulary_means_no_limit(llm: LLM) -> None:
    huge = SamplingParams(temperature=0.0, max_tokens=4, top_k=2**63 - 1)
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    got, want = llm.generate(["def f():", "def f():"], [huge, plain], use_tqdm=False)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_dummy_load_format_needs_no_checkpoint(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "shape-only"
    shutil.copytree(tiny_model(), folder)
    (folder / "model.safetensors").unlink()
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    first = LLM(str(folder), dtype="float32", load_format="dummy")
    tokens = first.generate(["def f():"], params, use_tqdm=False)[0].outputs[0].token_ids
    again = LLM(str(folder), dtype="float32", load_format="dummy").generate(["def f():"], params, use_tqdm=False)
    assert len(tokens) == 5 and again[0].outputs[0].token_ids == tokens  # seeded: reproducible
    norms = [p for n, p in first.engine.runner.model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    with pytest.raises(ConfigError, match="load_format"):
        LLM(str(folder), load_format="pickle")
