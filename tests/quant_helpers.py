"""Shared by the quantization tests: plain-torch dequantization written from each format's
documentation (independent of the plugins' packing code), a dense transformers model rebuilt
from it, and a one-prompt prefill through pagedserve's paged model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve.core.config import ModelConfig
from pagedserve.core.forward_context import build_batch_layout, set_forward_context
from pagedserve.core.layers.attention import Attention
from pagedserve.core.loader import load_model
from pagedserve.plugins.attention.torch_ref.backend import TorchRefBackend

#: AutoAWQ's GEMM layout: nibble i of a word holds column AWQ_ORDER[i] of the word's eight.
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def nibbles(words: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Value i of every word (bits i*bits .. (i+1)*bits - 1), for i = 0 .. 32/bits - 1."""
    return [(words.to(torch.int64) >> (bits * i)) & ((1 << bits) - 1) for i in range(32 // bits)]


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] words packed along rows -> [R * per, C]: row r*per + i is value i of word row r."""
    parts = nibbles(words, bits)
    out = torch.empty(words.shape[0] * len(parts), words.shape[1], dtype=torch.int64)
    for i, part in enumerate(parts):
        out[i :: len(parts)] = part
    return out


def unpack_cols(words: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """[R, C] words packed along columns -> [R, C * per]: value i of word c is column
    c*per + order[i] (sequential without an order)."""
    parts = nibbles(words, bits)
    order = order or list(range(len(parts)))
    out = torch.empty(words.shape[0], words.shape[1] * len(parts), dtype=torch.int64)
    for i, part in enumerate(parts):
        out[:, order[i] :: len(parts)] = part
    return out


def dense_awq(tensors: dict[str, torch.Tensor], module: str, group: int) -> torch.Tensor:
    q = unpack_cols(tensors[f"{module}.qweight"], 4, AWQ_ORDER)
    z = unpack_cols(tensors[f"{module}.qzeros"], 4, AWQ_ORDER)
    s = tensors[f"{module}.scales"].float()
    rows = torch.arange(q.shape[0]) // group
    return ((q - z[rows]).float() * s[rows]).T


def dense_gptq(tensors: dict[str, torch.Tensor], module: str, bits: int, zero_offset: int = 1) -> torch.Tensor:
    q = unpack_rows(tensors[f"{module}.qweight"], bits)
    z = unpack_cols(tensors[f"{module}.qzeros"], bits) + zero_offset
    s = tensors[f"{module}.scales"].float()
    g = tensors[f"{module}.g_idx"].long()
    return ((q - z[g]).float() * s[g]).T


def dense_fp8(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return tensors[f"{module}.weight"].float() * tensors[f"{module}.weight_scale"].float()


def decoder_linear_layers(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The names of a dense Llama checkpoint's decoder linear layers."""
    return {n.rpartition(".")[0] for n in tensors if ".layers." in n and n.endswith("_proj.weight")}


def dense_reference(folder: Path, dequantize, quantized: set[str] | None = None) -> torch.nn.Module:
    """transformers' model of ``folder`` with every quantized layer (by default those with a
    ``qweight`` or ``weight_scale``) replaced by ``dequantize(tensors, module_name)`` in fp32, the
    other tensors as stored."""
    tensors = load_file(str(folder / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if quantized is None:
        quantized = {name.rpartition(".")[0] for name in tensors if name.endswith((".qweight", ".weight_scale"))}
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")
        if module in quantized:
            if kind in ("qweight", "weight"):
                state[f"{module}.weight"] = dequantize(tensors, module)
            elif kind == "bias":  # a quantized layer keeps its bias dense (Qwen2's q/k/v)
                state[name] = tensor.float()
        else:
            state[name] = tensor.float()
    config_dict = json.loads((folder / "config.json").read_text())
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model


def hf_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def paged_logits(model: torch.nn.Module, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """One prefill of ``token_ids`` through pagedserve's model and the reference attention."""
    backend = TorchRefBackend(config=None)
    blocks = math.ceil(len(token_ids) / block_size)
    for layer in model.modules():
        if isinstance(layer, Attention):
            shape = backend.kv_cache_shape(blocks, block_size, layer.num_kv_heads, layer.head_size)
            layer.kv_cache = torch.zeros(shape)
    layout = build_batch_layout([(list(range(blocks)), 0, len(token_ids))], block_size, "cpu")
    with torch.no_grad(), set_forward_context(backend, backend.build_metadata(layout)):
        return model.compute_logits(model(torch.tensor(token_ids), layout.positions)).float()


def load(folder: Path, quantization: str | None = None) -> torch.nn.Module:
    return load_model(ModelConfig(model=str(folder), dtype="float32"), quantization, "cpu")
