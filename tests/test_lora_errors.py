"""What the LoRA plugin refuses at load time (each message names the field), and that a refused
adapter leaves the engine serving; a GPTQ base model with an adapter matches PEFT on the
dequantized model."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, LoRARequest, SamplingParams

from lora_helpers import edit_adapter_config, make_peft_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model()


@pytest.fixture(scope="module")
def good_adapter(model_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(model_dir, tmp_path_factory.mktemp("lora") / "good", seed=1, r=4)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(str(model_dir), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)


def variant(good: Path, tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(good, folder)
    edit_adapter_config(folder, **config_changes)
    return folder


def refused(llm: LLM, path: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request("bad", "x = 1", lora_request=LoRARequest("bad", 99, str(path)))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "use_dora"),
        ({"r": 16, "rank_pattern": {}}, "r=16 exceeds max_lora_rank=8"),
        ({"bias": "lora_only"}, "bias="),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules includes 'lm_head'"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_unsupported_config_fields_are_refused_by_name(llm, good_adapter, tmp_path, changes, match) -> None:
    refused(llm, variant(good_adapter, tmp_path, **changes), match)


def test_adapters_peft_makes_with_what_we_cannot_serve_are_refused(llm, model_dir, tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("refused")
    embed = make_peft_adapter(model_dir, root / "embed", seed=2, target_modules=["embed_tokens", "q_proj"])
    refused(llm, embed, "embeddings")
    dora = make_peft_adapter(model_dir, root / "dora", seed=3, target_modules=["q_proj"], use_dora=True)
    refused(llm, dora, "use_dora")
    big = make_peft_adapter(model_dir, root / "big", seed=4, r=16)
    refused(llm, big, "exceeds max_lora_rank=8")


def test_an_adapter_of_another_base_model_is_refused(llm, tiny_model, tmp_path) -> None:
    other = tiny_model(hidden_size=32, intermediate_size=64)
    adapter = make_peft_adapter(other, tmp_path / "other", seed=5)
    refused(llm, adapter, "another base model")


def test_a_pickle_adapter_and_broken_folders_are_refused(llm, good_adapter, tmp_path) -> None:
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(good_adapter / "adapter_config.json", pickled)
    torch.save(load_file(str(good_adapter / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    refused(llm, pickled, "pickle")
    refused(llm, tmp_path / "missing", "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(llm, empty, "no LoRA format recognises")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good_adapter, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    refused(llm, corrupt, "cannot read")
    (corrupt / "adapter_config.json").write_text("{")
    refused(llm, corrupt, "not valid JSON")


def test_the_engine_keeps_serving_after_refusals_and_lora_needs_enable_lora(llm, good_adapter, model_dir) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4)
    out = llm.generate(["x = 1"], params, lora_request=LoRARequest("good", 1, str(good_adapter)), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    plain = LLM(str(model_dir), dtype="float32")
    with pytest.raises(ValueError, match="without enable_lora"):
        plain.generate(["x"], params, lora_request=LoRARequest("good", 1, str(good_adapter)), use_tqdm=False)


def test_gptq_base_model_with_an_adapter_matches_peft_on_the_dequantized_model(tiny_model, tmp_path) -> None:
    from click.testing import CliRunner
    from peft import PeftModel

    from pagedserve.plugins.quant.quantize_cli import quantize
    from quant_helpers import dense_gptq, dense_reference

    source = tiny_model(hidden_size=128, intermediate_size=256)
    out = tmp_path / "gptq"
    result = CliRunner().invoke(
        quantize, [str(source), str(out), "--num-samples", "8", "--seq-len", "64", "--method", "gptq", "--group-size", "32"]
    )
    assert result.exit_code == 0, result.output
    adapter = make_peft_adapter(source, tmp_path / "adapter", seed=7, r=4, scale=0.3)
    reference = PeftModel.from_pretrained(dense_reference(out, functools.partial(dense_gptq, bits=4)), str(adapter)).eval()
    prompt = [0, *range(5, 17)]
    with torch.no_grad():
        expected = reference.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False
        )[0, len(prompt) :].tolist()
        with reference.disable_adapter():
            base = reference.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False
            )[0, len(prompt) :].tolist()
    assert expected != base
    llm = LLM(str(out), dtype="float32", quantization="gptq", num_kv_blocks=16, enable_lora=True, max_lora_rank=4)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    got = llm.generate([{"prompt_token_ids": prompt}], greedy, lora_request=LoRARequest("a", 1, str(adapter)), use_tqdm=False)
    assert got[0].outputs[0].token_ids == expected
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
