"""Quantized checkpoints as the real tools write them, loaded by pagedserve and compared with
transformers running the plain-torch dequantized weights (``quant_helpers``).

AWQ checkpoints come from AutoAWQ itself, FP8 ones from the compressed-tensors library (what
llm-compressor saves with), from vLLM's ``fp8`` layout built by hand, and from ``pagedserve
quantize``; GPTQ ones from ``pagedserve quantize`` (GPTQModel does not install next to torch 2.13;
its classic layout is checked against hand-worked words in ``test_quant_packing.py``).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from quant_helpers import (
    decoder_linear_layers,
    dense_awq,
    dense_fp8,
    dense_gptq,
    dense_reference,
    hf_logits,
    load,
    paged_logits,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.plugins.quant.quantize_cli import quantize

pytestmark = pytest.mark.slow

PROMPT = [0, *range(5, 45)]
#: Output sizes must be multiples of 64 for AutoAWQ's clipping search: 4 heads of 32, 2 KV heads.
SHAPE = {"hidden_size": 128, "intermediate_size": 256}


@pytest.fixture(scope="module")
def source(tiny_model) -> Path:
    return tiny_model(**SHAPE)


def run_quantize(source: Path, out: Path, *args: str) -> Path:
    result = CliRunner().invoke(quantize, [str(source), str(out), "--num-samples", "8", "--seq-len", "64", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def assert_matches_reference(folder: Path, dequantize, quantization: str | None = None) -> None:
    expected = hf_logits(dense_reference(folder, dequantize), PROMPT)
    got = paged_logits(load(folder, quantization), PROMPT)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.5  # logits far from uniform: the comparison means something


def test_autoawq_checkpoint(source: Path, tmp_path: Path) -> None:
    pytest.importorskip("awq")
    out = run_quantize(source, tmp_path / "awq", "--method", "awq", "--group-size", "32")
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (settings["quant_method"], settings["version"], settings["group_size"]) == ("awq", "gemm", 32)
    assert (out / "tokenizer.json").is_file()
    assert_matches_reference(out, functools.partial(dense_awq, group=32))


@pytest.mark.parametrize(
    ("bits", "group", "act_order", "sym"),
    [(4, 32, True, True), (4, 64, False, False), (8, -1, True, False)],
)
def test_gptq_checkpoint(source: Path, tmp_path: Path, bits: int, group: int, act_order: bool, sym: bool) -> None:
    flags = ["--desc-act" if act_order else "--no-desc-act", "--sym" if sym else "--asym"]
    settings_flags = ["--bits", str(bits), "--group-size", str(group), *flags]
    out = run_quantize(source, tmp_path / "gptq", "--method", "gptq", *settings_flags)
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert settings == json.loads((out / "quantize_config.json").read_text())
    read = (settings["bits"], settings["group_size"], settings["desc_act"], settings["sym"])
    assert read == (bits, group, act_order, sym)
    assert settings["checkpoint_format"] == "gptq"
    g_idx = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.g_idx"]
    assert bool((g_idx.diff() < 0).any()) == (act_order and group != -1)  # act-order shuffles groups
    assert_matches_reference(out, functools.partial(dense_gptq, bits=bits))


def test_gptq_settings_from_quantize_config_json_alone(source: Path, tmp_path: Path) -> None:
    """Older AutoGPTQ checkpoints keep their settings only in quantize_config.json, without a
    quant_method; the file is claimed by the gptq format."""
    out = run_quantize(source, tmp_path / "gptq", "--method", "gptq", "--group-size", "64")
    config = json.loads((out / "config.json").read_text())
    settings = config.pop("quantization_config")
    settings.pop("quant_method")
    (out / "config.json").write_text(json.dumps(config))
    (out / "quantize_config.json").write_text(json.dumps(settings))
    expected = hf_logits(dense_reference_with(out, settings), PROMPT)
    torch.testing.assert_close(paged_logits(load(out), PROMPT), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(paged_logits(load(out, "gptq"), PROMPT), expected, rtol=1e-4, atol=1e-4)


def dense_reference_with(folder: Path, settings: dict) -> torch.nn.Module:
    """``dense_reference`` for a folder whose config.json lacks the quantization settings."""
    copy = folder.parent / f"{folder.name}-with-config"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "quantization_config": settings}))
    return dense_reference(copy, functools.partial(dense_gptq, bits=settings["bits"]))


@pytest.mark.parametrize("scales", ["channel", "tensor"])
def test_fp8_checkpoint_from_pagedserve_quantize(source: Path, tmp_path: Path, scales: str) -> None:
    out = run_quantize(source, tmp_path / "fp8", "--method", "fp8", "--fp8-scales", scales)
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert settings["config_groups"]["group_0"]["weights"]["strategy"] == scales
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(settings)  # the library accepts what we write
    assert_matches_reference(out, dense_fp8)


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "FP8"])
def test_fp8_checkpoint_written_by_compressed_tensors(source: Path, tmp_path: Path, scheme: str) -> None:
    """llm-compressor's save path: the library compresses a model carrying FP8 schemes whose
    weight scales an observer set (min-max, done here by hand: observers live in llm-compressor)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    group = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[scheme])
    config = QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                amax = module.weight.float().abs().amax(dim=1, keepdim=True)
                amax = amax.amax().reshape(1) if module.weight_scale.numel() == 1 else amax
                module.weight_scale.copy_(amax / 448)
                if hasattr(module, "input_scale"):
                    module.input_scale.fill_(0.05)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path)
    compressor.update_config(str(tmp_path))
    for item in source.glob("tokenizer*"):
        shutil.copy(item, tmp_path / item.name)
    settings = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert settings["quant_method"] == "compressed-tensors" and settings["format"] == "float-quantized"
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert_matches_reference(tmp_path, dense_fp8)


def test_vllm_fp8_checkpoint_with_static_input_scales(source: Path, tmp_path: Path) -> None:
    """vLLM's own layout: per-tensor ``weight_scale`` and ``input_scale`` scalars."""
    tensors = load_file(str(source / "model.safetensors"))
    for module in decoder_linear_layers(tensors):
        name = f"{module}.weight"
        weight = tensors[name]
        scale = weight.abs().max() / 448
        tensors[name] = (weight / scale).to(torch.float8_e4m3fn)
        tensors[name.replace(".weight", ".weight_scale")] = scale.reshape(())
        tensors[name.replace(".weight", ".input_scale")] = torch.tensor(0.02)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_matches_reference(tmp_path, dense_fp8)


def test_fp8_quantized_while_loading_an_unquantized_checkpoint(source: Path) -> None:
    def per_channel_fp8(tensors: dict, module: str) -> torch.Tensor:
        weight = tensors[f"{module}.weight"].float()
        scale = weight.abs().amax(dim=1, keepdim=True) / 448
        return (weight / scale).to(torch.float8_e4m3fn).float() * scale

    layers = decoder_linear_layers(load_file(str(source / "model.safetensors")))
    reference = dense_reference(source, per_channel_fp8, layers)
    model = load(source, "fp8")
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(paged_logits(model, PROMPT), hf_logits(reference, PROMPT), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("torch_compile", [False, True])
def test_engine_generates_from_a_gptq_checkpoint_like_its_dense_reference(
    source: Path, tmp_path: Path, torch_compile: bool
) -> None:
    """Eager, and compiled: the quantized linear method's unpack-and-matmul traced by dynamo."""
    out = run_quantize(source, tmp_path / "gptq", "--method", "gptq", "--group-size", "32")
    reference = dense_reference(out, functools.partial(dense_gptq, bits=4))
    prompt = torch.tensor([PROMPT[:12]])
    expected = reference.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 12:]
    llm = LLM(str(out), dtype="float32", quantization="gptq", num_kv_blocks=16, torch_compile=torch_compile)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": PROMPT[:12]}], greedy)
    assert output[0].outputs[0].token_ids == expected.tolist()
