"""Quantized checkpoints of the new families: Qwen2 (q/k/v biases beside quantized weights) and
Phi-3 (its fused qkv_proj / gate_up_proj quantized as single layers, cut into shards on load) in
GPTQ, AWQ and FP8, against transformers running the dequantized weights; MoE experts are refused
clearly."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from quant_helpers import dense_awq, dense_fp8, dense_gptq, dense_reference, hf_logits, load, paged_logits
from safetensors.torch import load_file, save_file
from test_quant_checkpoints import PROMPT, SHAPE, run_quantize

from pagedserve.plugins.quant.packing import pack_int32, sequential_to_awq

pytestmark = pytest.mark.slow


def assert_matches_reference(folder: Path, dequantize) -> None:
    expected = hf_logits(dense_reference(folder, dequantize), PROMPT)
    torch.testing.assert_close(paged_logits(load(folder), PROMPT), expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.5


@pytest.fixture(scope="module")
def qwen2(tiny_model) -> Path:
    return tiny_model("Qwen2ForCausalLM", **SHAPE)


@pytest.fixture(scope="module")
def phi3(tiny_model) -> Path:
    return tiny_model("Phi3ForCausalLM", **SHAPE)


def test_qwen2_fp8(qwen2: Path, tmp_path: Path) -> None:
    assert_matches_reference(run_quantize(qwen2, tmp_path / "fp8", "--method", "fp8"), dense_fp8)


def write_awq(source: Path, out: Path, group: int = 32) -> Path:
    """An AutoAWQ GEMM-layout checkpoint of ``source`` by round-to-nearest (asymmetric 4-bit,
    ``group`` inputs per scale): what AutoAWQ writes, without its (slow) scale search."""
    tensors = load_file(str(source / "model.safetensors"))
    quantized: dict[str, torch.Tensor] = {}
    for name, weight in tensors.items():
        module = name.removesuffix(".weight")
        if ".layers." not in name or not name.endswith("_proj.weight"):
            quantized[name] = weight
            continue
        w = weight.float().T.reshape(weight.shape[1] // group, group, weight.shape[0])  # [groups, g, out]
        low, high = w.amin(1), w.amax(1)
        scales = ((high - low) / 15).clamp(min=1e-8)
        zeros = torch.round(-low / scales).clamp(0, 15)
        q = torch.clamp(torch.round(w / scales[:, None]) + zeros[:, None], 0, 15).reshape(weight.shape[1], -1)
        quantized[f"{module}.qweight"] = pack_int32(sequential_to_awq(q.to(torch.int64)), 4, dim=1)
        quantized[f"{module}.qzeros"] = pack_int32(sequential_to_awq(zeros.to(torch.int64)), 4, dim=1)
        quantized[f"{module}.scales"] = scales.to(torch.float16)
    shutil.copytree(source, out)
    save_file(quantized, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_phi3_awq(phi3: Path, tmp_path: Path) -> None:
    """AWQ packs eight output columns per word: the fused qkv_proj is cut at word boundaries."""
    assert_matches_reference(write_awq(phi3, tmp_path / "awq"), functools.partial(dense_awq, group=32))


@pytest.mark.parametrize("method", ["gptq", "fp8"])
def test_phi3_fused_layers_quantized(phi3: Path, tmp_path: Path, method: str) -> None:
    out = run_quantize(phi3, tmp_path / method, "--method", method, *(["--group-size", "32"] if method == "gptq" else []))
    dequantize = functools.partial(dense_gptq, bits=4) if method == "gptq" else dense_fp8
    assert_matches_reference(out, dequantize)


def test_moe_experts_with_a_weight_format_are_refused(tiny_model) -> None:
    mixtral = tiny_model("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="experts of a mixture-of-experts model cannot be served with quantization 'fp8'"):
        load(mixtral, "fp8")
