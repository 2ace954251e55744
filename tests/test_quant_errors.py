"""Every way to get a quantized checkpoint wrong is a clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from quant_helpers import load

from pagedserve.core.layers.linear import Linear
from pagedserve.plugins.quant.awq import AWQConfig
from pagedserve.plugins.quant.compressed_tensors import CompressedTensorsConfig
from pagedserve.plugins.quant.fp8 import Fp8Config
from pagedserve.plugins.quant.gptq import GPTQConfig
from pagedserve.plugins.quant.quantize_cli import quantize

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


def fp8_group(**weights: Any) -> dict[str, Any]:
    scheme = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**scheme, **weights}}},
    }


@pytest.mark.parametrize(
    ("cls", "settings", "message"),
    [
        (AWQConfig, {**AWQ, "bits": 8}, "bits=8 are not supported"),
        (AWQConfig, {**AWQ, "group_size": 256}, "group_size=256 are not supported"),
        (AWQConfig, {**AWQ, "version": "gemv"}, "version 'gemv' is not supported"),
        (AWQConfig, {**AWQ, "zero_point": False}, "without zero points"),
        (GPTQConfig, {**GPTQ, "bits": 3}, "bits=3 are not supported"),
        (GPTQConfig, {**GPTQ, "group_size": 48}, "group_size=48 are not supported"),
        (GPTQConfig, {**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
        (GPTQConfig, {**GPTQ, "lm_head": True}, "quantized lm_head"),
        (Fp8Config, {"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
        (CompressedTensorsConfig, fp8_group(type="int", num_bits=4), "int 4-bit weights"),
        (CompressedTensorsConfig, fp8_group(strategy="block"), "strategy='block'"),
        (CompressedTensorsConfig, {**fp8_group(), "format": "pack-quantized"}, "format 'pack-quantized'"),
    ],
)
def test_unsupported_settings_are_refused(cls: type, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls.from_config(settings)


def test_supported_settings_are_read_in_both_spellings() -> None:
    old_autoawq = AWQConfig.from_config({"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
    assert old_autoawq.group_size == 64
    v2 = GPTQConfig.from_config({**GPTQ, "group_size": -1, "bits": 8, "checkpoint_format": "gptq_v2"})
    assert (v2.bits, v2.group_size, v2.zero_offset) == (8, -1, 0)


def test_a_group_size_that_does_not_divide_the_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="layers.0.o_proj: group size 128 does not divide its 96"):
        Linear(96, 64, quant_config=GPTQConfig.from_config(GPTQ), prefix="layers.0.o_proj")
    with pytest.raises(ValueError, match=r"output sizes \[4\] are not multiples of 8"):
        Linear(128, [64, 4], quant_config=AWQConfig.from_config(AWQ), prefix="qkv")


def with_settings(source: Path, folder: Path, settings: dict[str, Any] | None) -> Path:
    """A copy of ``source`` (its weights linked) whose config declares ``settings``."""
    folder.mkdir()
    for item in source.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "config.json").unlink()
    config = json.loads((source / "config.json").read_text())
    if settings is not None:
        config["quantization_config"] = settings
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_forced_method_must_match_the_checkpoint(tiny_model, tmp_path: Path) -> None:
    gptq_checkpoint = with_settings(tiny_model(), tmp_path / "gptq", {**GPTQ, "group_size": 32})
    with pytest.raises(ValueError, match="quantization='awq' does not match the checkpoint's quant_method 'gptq'"):
        load(gptq_checkpoint, "awq")
    with pytest.raises(ValueError, match="quantization='none' was requested but the checkpoint is quantized"):
        load(gptq_checkpoint, "none")


@pytest.mark.parametrize(("method", "message"), [("awq", "needs a checkpoint quantized with AWQ"),
                                                 ("gptq", "needs a checkpoint quantized with GPTQ")])
def test_formats_that_cannot_quantize_while_loading_say_so(tiny_model, method: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load(tiny_model(), method)


def test_a_dense_checkpoint_declared_quantized_names_the_missing_tensors(tiny_model, tmp_path: Path) -> None:
    folder = with_settings(tiny_model(), tmp_path / "awq", {**AWQ, "group_size": 32})
    with pytest.raises(ValueError, match="does not expect.*quantization setting"):
        load(folder)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(quantize, list(args))


def test_quantize_command_refuses_bad_settings(tiny_model, tmp_path: Path) -> None:
    source = str(tiny_model())
    result = invoke(source, str(tmp_path / "a"), "--method", "awq", "--bits", "8")
    assert result.exit_code == 2 and "awq supports 4 bits" in result.output
    result = invoke(source, str(tmp_path / "b"), "--method", "gptq", "--group-size", "48")
    assert result.exit_code == 2 and "gptq supports group sizes -1, 32, 64, 128" in result.output
    result = invoke(source, str(tmp_path / "c"), "--method", "gptq", "--group-size", "128", "--num-samples", "2")
    assert result.exit_code == 1 and "group size 128 does not divide the 64 input features" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    result = invoke(source, str(tmp_path / "full"), "--method", "fp8")
    assert result.exit_code == 1 and "exists and is not empty" in result.output
    quantized = with_settings(tiny_model(), tmp_path / "q", GPTQ)
    result = invoke(str(quantized), str(tmp_path / "d"), "--method", "fp8")
    assert result.exit_code == 1 and "already quantized" in result.output


def test_quantize_awq_without_autoawq_says_how_to_install_it(tiny_model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "awq", None)  # makes `import awq` fail
    result = invoke(str(tiny_model()), str(tmp_path / "o"), "--method", "awq", "--group-size", "32",
                    "--num-samples", "2", "--seq-len", "16")
    assert result.exit_code == 1 and "pip install 'pagedserve[awq]'" in result.output


def test_quantize_is_a_pagedserve_command_added_by_its_plugin() -> None:
    from pagedserve.cli import _add_plugin_commands, cli

    _add_plugin_commands()
    assert cli.commands["quantize"] is quantize
