"""The loader: folders, configs, dtypes, safetensors shard sets, and every refusal it makes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from pagedserve.core.config import ModelConfig
from pagedserve.core.loader import (
    ModelLoadError,
    get_model_max_len,
    load_generation_config,
    load_hf_config,
    load_model,
    resolve_dtype,
    resolve_model_path,
)
from pagedserve.core.plugins import PluginError


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def copy_config(source: Path, target: Path, **changes: object) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


def load(path: Path, dtype: str = "auto") -> torch.nn.Module:
    return load_model(ModelConfig(model=str(path), dtype=dtype), None, "cpu")


def test_load_model_fills_the_model_config_and_every_weight(tiny_folder: Path) -> None:
    model_config = ModelConfig(model=str(tiny_folder))
    model = load_model(model_config, None, "cpu")
    assert model_config.model_path == str(tiny_folder)
    assert model_config.hf_config.architectures == ["LlamaForCausalLM"]
    state = load_file(tiny_folder / "model.safetensors")
    torch.testing.assert_close(model.model.norm.weight, state["model.norm.weight"])
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    torch.testing.assert_close(qkv[64:96], state["model.layers.1.self_attn.k_proj.weight"])
    assert not model.training


def test_sharded_checkpoint_loads_the_same_weights(tiny_folder: Path, tmp_path: Path) -> None:
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded, single = load(tmp_path), load(tiny_folder)
    for (name, a), (_, b) in zip(sharded.named_parameters(), single.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_dtype_setting_builds_parameters_in_that_dtype(tiny_folder: Path) -> None:
    model = load(tiny_folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_pickle_only_checkpoint_is_refused(tiny_folder: Path, tmp_path: Path) -> None:
    copy_config(tiny_folder, tmp_path)
    torch.save(load_file(tiny_folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle checkpoints \(pytorch_model.bin\).*arbitrary code.*save_pretrained"):
        load(tmp_path)


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json in"):
        load(tmp_path)


def test_missing_weights_are_a_clear_error(tiny_folder: Path, tmp_path: Path) -> None:
    copy_config(tiny_folder, tmp_path)
    with pytest.raises(ModelLoadError, match=r"no model weights \(\*.safetensors\)"):
        load(tmp_path)


def test_missing_shard_of_an_index_is_a_clear_error(tiny_folder: Path, tmp_path: Path) -> None:
    copy_config(tiny_folder, tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="shards missing.*model-00001-of-00002"):
        load(tmp_path)


@pytest.mark.parametrize("outside", ["../other/model.safetensors", "ABSOLUTE", "sub/../../x.safetensors", ""])
def test_an_index_cannot_name_weights_outside_the_model_folder(
    tiny_folder: Path, tmp_path: Path, outside: str
) -> None:
    """The shard outside exists and is a valid checkpoint: only the folder check refuses it."""
    model_dir, other = tmp_path / "model", tmp_path / "other"
    model_dir.mkdir()
    other.mkdir()
    copy_config(tiny_folder, model_dir)
    shutil.copy(tiny_folder / "model.safetensors", other / "model.safetensors")
    shutil.copy(tiny_folder / "model.safetensors", tmp_path / "x.safetensors")
    if outside == "ABSOLUTE":
        outside = str(other / "model.safetensors")
    names = load_file(tiny_folder / "model.safetensors")
    index = {"weight_map": dict.fromkeys(names, outside)}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="not a file inside the model folder"):
        load(model_dir)


def test_an_index_may_name_shards_in_a_subfolder(tiny_folder: Path, tmp_path: Path) -> None:
    copy_config(tiny_folder, tmp_path)
    (tmp_path / "shards").mkdir()
    shutil.copy(tiny_folder / "model.safetensors", tmp_path / "shards" / "model.safetensors")
    names = load_file(tiny_folder / "model.safetensors")
    index = {"weight_map": dict.fromkeys(names, "shards/model.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load(tmp_path).model.norm.weight.shape == names["model.norm.weight"].shape


def test_unknown_architecture_lists_the_known_ones(tiny_folder: Path, tmp_path: Path) -> None:
    copy_config(tiny_folder, tmp_path, architectures=["FancyForCausalLM"])
    (tmp_path / "model.safetensors").symlink_to(tiny_folder / "model.safetensors")
    with pytest.raises(PluginError, match="FancyForCausalLM.*known:.*LlamaForCausalLM.*MistralForCausalLM"):
        load(tmp_path)


def rewrite_weights(source: Path, target: Path, change) -> Path:
    copy_config(source, target)
    state = load_file(source / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors")
    return target


def test_a_weight_missing_from_the_checkpoint_is_named(tiny_folder: Path, tmp_path: Path) -> None:
    rewrite_weights(tiny_folder, tmp_path, lambda s: s.pop("model.layers.0.self_attn.v_proj.weight"))
    with pytest.raises(ValueError, match="lacks 1 weight.*model.layers.0.self_attn.qkv_proj.weight"):
        load(tmp_path)


def test_an_unexpected_weight_is_named(tiny_folder: Path, tmp_path: Path) -> None:
    rewrite_weights(tiny_folder, tmp_path, lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="'model.layers.0.extra.weight' that LlamaForCausalLM does not expect"):
        load(tmp_path)


def test_a_weight_of_the_wrong_shape_is_named(tiny_folder: Path, tmp_path: Path) -> None:
    rewrite_weights(tiny_folder, tmp_path, lambda s: s.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="cannot load 'model.norm.weight'.*shape"):
        load(tmp_path)


def test_missing_local_folder_is_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


def test_hub_id_while_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="could not be fetched.*pass a local folder"):
        resolve_model_path("pagedserve-tests/not-a-model")


@pytest.mark.parametrize(
    ("setting", "config", "device", "expected"),
    [
        ("auto", SimpleNamespace(torch_dtype=torch.float16), "cuda", torch.float16),
        ("auto", SimpleNamespace(dtype="bfloat16"), "cuda", torch.bfloat16),
        ("auto", SimpleNamespace(dtype="float32"), "cpu", torch.float32),
        ("auto", SimpleNamespace(), "cpu", torch.float32),
        ("float16", SimpleNamespace(dtype="float16"), "cpu", torch.float32),
        ("float16", SimpleNamespace(dtype="float32"), "cuda:0", torch.float16),
        ("bfloat16", SimpleNamespace(dtype="float32"), "cpu", torch.bfloat16),
    ],
)
def test_resolve_dtype(setting: str, config: object, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(setting, config, device) == expected


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("checkpoint", ["float16", "bfloat16"])
def test_auto_dtype_of_a_half_checkpoint_on_the_cpu_follows_amx(
    monkeypatch: pytest.MonkeyPatch, amx: bool, checkpoint: str
) -> None:
    """bfloat16 where the CPU has AMX bf16 tiles (torch's capability report), float32 elsewhere."""
    capabilities = {**torch.cpu.get_capabilities(), "amx_bf16": amx}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    expected = torch.bfloat16 if amx else torch.float32
    assert resolve_dtype("auto", SimpleNamespace(dtype=checkpoint), "cpu") == expected
    assert resolve_dtype("auto", SimpleNamespace(dtype="float32"), "cpu") == torch.float32


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SimpleNamespace(max_position_embeddings=512), 512),
        (SimpleNamespace(max_position_embeddings=512, seq_length=256), 256),
        (SimpleNamespace(max_position_embeddings=512, rope_parameters={"rope_type": "linear", "factor": 2.0}), 1024),
        (SimpleNamespace(max_position_embeddings=512, rope_scaling={"type": "dynamic", "factor": 4.0}), 2048),
        (SimpleNamespace(max_position_embeddings=131072, rope_parameters={"rope_type": "llama3", "factor": 8.0}), 131072),
        (SimpleNamespace(), 2048),
    ],
)
def test_model_max_len(config: object, expected: int) -> None:
    assert get_model_max_len(config) == expected


def test_generation_config(tiny_folder: Path, tmp_path: Path) -> None:
    assert load_generation_config(str(tiny_folder))["eos_token_id"] == 2
    assert load_generation_config(str(tmp_path)) == {}


def test_remote_code_configs_are_not_trusted(tiny_folder: Path, tmp_path: Path) -> None:
    copy_config(tiny_folder, tmp_path, model_type="custom", auto_map={"AutoConfig": "x.Config"})
    with pytest.raises(ModelLoadError, match="cannot read the config"):
        load_hf_config(str(tmp_path))
