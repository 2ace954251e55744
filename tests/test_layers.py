"""Core layers against their transformers counterparts, and the step's batch layout."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from pagedserve.core.forward_context import build_batch_layout, set_forward_context
from pagedserve.core.layers.embedding import LMHead, VocabEmbedding
from pagedserve.core.layers.linear import Linear
from pagedserve.core.layers.norm import RMSNorm
from pagedserve.core.layers.quantization import (
    LinearMethod,
    QuantizationConfig,
    UnquantizedLinearMethod,
    get_quantization_config,
    set_weight_attrs,
)
from pagedserve.core.layers.rotary import get_rope, rope_parameters_from_config, rotary_dim_from_config
from pagedserve.core.loader import get_model_max_len
from pagedserve.core.plugins import Entry, PluginError, get_plugin_manager

HEADS, HEAD_DIM, MAX_POSITION = 4, 16, 64

ROPE_CASES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "mscale": 0.7,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
    },
    # Longer than the original length: HF takes the long factors, as we always do then.
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 16,
        "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0],
    },
}


def hf_rotate(config: LlamaConfig, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """HF's rotary on [T, H*D] tensors, positions in the given order."""
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    q4 = q.view(1, len(positions), -1, HEAD_DIM).transpose(1, 2)
    k4 = k.view(1, len(positions), -1, HEAD_DIM).transpose(1, 2)
    q_out, k_out = apply_rotary_pos_emb(q4, k4, cos, sin)
    return (
        q_out.transpose(1, 2).reshape(len(positions), -1),
        k_out.transpose(1, 2).reshape(len(positions), -1),
    )


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rotary_matches_transformers(case: str) -> None:
    params = ROPE_CASES[case]
    config = LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITION,
        rope_parameters=dict(params),
    )
    theta, scaling = rope_parameters_from_config(config)
    rope = get_rope(HEAD_DIM, HEAD_DIM, MAX_POSITION, theta, scaling)
    # Every position of the cache, shuffled. For dynamic scaling HF then sees the longest
    # sequence (max_position * factor), the length our fixed scaling is computed for.
    positions = torch.randperm(rope.max_len, generator=torch.Generator().manual_seed(0))
    q = torch.randn(len(positions), HEADS * HEAD_DIM)
    k = torch.randn(len(positions), 2 * HEAD_DIM)
    ours = rope(positions, q, k)
    expected = hf_rotate(config, positions, q, k)
    torch.testing.assert_close(ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1])


def test_dynamic_rope_is_fixed_at_the_longest_length_unlike_hf_on_short_batches() -> None:
    params = ROPE_CASES["dynamic"]
    config = LlamaConfig(
        hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, max_position_embeddings=MAX_POSITION,
        rope_parameters=dict(params),
    )
    rope = get_rope(HEAD_DIM, HEAD_DIM, MAX_POSITION, *rope_parameters_from_config(config))
    assert rope.max_len == 2 * MAX_POSITION
    positions = torch.arange(10, 20)
    q, k = torch.randn(10, HEADS * HEAD_DIM), torch.randn(10, HEAD_DIM)
    short_hf = hf_rotate(config, positions, q, k)  # HF: unscaled, the batch is short
    assert not torch.allclose(rope(positions, q, k)[0], short_hf[0])


def test_partial_rotary_dim_leaves_the_rest_of_each_head() -> None:
    rope = get_rope(HEAD_DIM, 8, MAX_POSITION, 10000.0, None)
    q = torch.randn(5, 2 * HEAD_DIM)
    q_out, _ = rope(torch.arange(5), q, q.clone())
    heads_in, heads_out = q.view(5, 2, HEAD_DIM), q_out.view(5, 2, HEAD_DIM)
    torch.testing.assert_close(heads_out[..., 8:], heads_in[..., 8:])
    torch.testing.assert_close(heads_out[0], heads_in[0])  # position 0 is not rotated
    assert not torch.allclose(heads_out[1:, :, :8], heads_in[1:, :, :8])


def test_unsupported_rope_type_is_refused() -> None:
    with pytest.raises(ValueError, match="mrope.*supported: default, linear, dynamic, llama3, yarn, longrope"):
        get_rope(HEAD_DIM, HEAD_DIM, MAX_POSITION, 10000.0, {"rope_type": "mrope", "factor": 2.0})


def test_yarn_covers_the_original_length_times_its_factor() -> None:
    rope = get_rope(HEAD_DIM, HEAD_DIM, MAX_POSITION, *rope_parameters_from_config(
        SimpleNamespace(rope_parameters=dict(ROPE_CASES["yarn"]))))  # fmt: skip
    assert rope.max_len == 64 and get_model_max_len(SimpleNamespace(
        max_position_embeddings=32, rope_parameters=dict(ROPE_CASES["yarn"]))) == 64  # fmt: skip


def test_su_is_longrope_with_the_original_length_beside_the_scaling() -> None:
    """Phi-3's older layout: ``rope_scaling={"type": "su", ...}``, the original length a config key."""
    longrope = dict(ROPE_CASES["longrope"])
    old = SimpleNamespace(
        rope_theta=longrope.pop("rope_theta"),
        original_max_position_embeddings=longrope.pop("original_max_position_embeddings"),
        rope_scaling={**longrope, "type": "su", "rope_type": None},
    )
    expected = get_rope(HEAD_DIM, HEAD_DIM, MAX_POSITION, *rope_parameters_from_config(
        SimpleNamespace(rope_parameters=dict(ROPE_CASES["longrope"]))))  # fmt: skip
    ours = get_rope(HEAD_DIM, HEAD_DIM, MAX_POSITION, *rope_parameters_from_config(old))
    torch.testing.assert_close(ours.cos_sin_cache, expected.cos_sin_cache)


def test_longrope_takes_the_short_factors_when_the_context_is_the_original_length() -> None:
    params = {**ROPE_CASES["longrope"], "original_max_position_embeddings": MAX_POSITION}
    config = LlamaConfig(
        hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, max_position_embeddings=MAX_POSITION,
        rope_parameters=dict(params),
    )
    rope = get_rope(HEAD_DIM, HEAD_DIM, MAX_POSITION, *rope_parameters_from_config(config))
    positions = torch.randperm(MAX_POSITION, generator=torch.Generator().manual_seed(0))
    q, k = torch.randn(MAX_POSITION, HEADS * HEAD_DIM), torch.randn(MAX_POSITION, HEAD_DIM)
    torch.testing.assert_close(rope(positions, q, k)[0], hf_rotate(config, positions, q, k)[0])


def test_partial_rotary_factor_from_either_config_layout() -> None:
    assert rotary_dim_from_config(SimpleNamespace(rope_parameters={"partial_rotary_factor": 0.5}), 16) == 8
    assert rotary_dim_from_config(SimpleNamespace(partial_rotary_factor=0.25), 16) == 4
    assert rotary_dim_from_config(SimpleNamespace(), 16) == 16


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SimpleNamespace(rope_parameters={"rope_theta": 5e5, "rope_type": "default"}), (5e5, None)),
        (
            SimpleNamespace(rope_parameters={"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}),
            (5e5, {"rope_type": "linear", "factor": 4.0}),
        ),
        (SimpleNamespace(rope_theta=1e6, rope_scaling=None), (1e6, None)),
        (
            SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0}),
            (1e6, {"type": "dynamic", "factor": 2.0}),
        ),
        (SimpleNamespace(), (10000.0, None)),
    ],
)
def test_rope_parameters_read_old_and_new_config_keys(config: Any, expected: tuple) -> None:
    assert rope_parameters_from_config(config) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype: torch.dtype) -> None:
    weight = torch.randn(32).to(dtype)
    ours, theirs = RMSNorm(32, eps=1e-5).to(dtype), LlamaRMSNorm(32, eps=1e-5)
    ours.weight.data.copy_(weight)
    theirs.weight.data = weight.clone()
    x, residual = torch.randn(7, 32).to(dtype), torch.randn(7, 32).to(dtype)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    out, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(out, theirs(x + residual), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_rms_norm_matches_transformers_gemma(dtype: torch.dtype) -> None:
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    weight = (torch.randn(32) * 0.1).to(dtype)
    ours, theirs = RMSNorm(32, eps=1e-6, weight_offset=1.0).to(dtype), Gemma2RMSNorm(32, eps=1e-6).to(dtype)
    ours.weight.data.copy_(weight)
    theirs.weight.data = weight.clone()
    x = torch.randn(7, 32).to(dtype)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)


def test_fused_checkpoint_tensor_loads_shard_by_shard() -> None:
    """Phi-3's qkv_proj stored as one tensor lands where three separate ones would."""
    separate, fused = Linear(8, [4, 2, 2], bias=True), Linear(8, [4, 2, 2], bias=True)
    weights = [torch.randn(n, 8) for n in (4, 2, 2)]
    biases = [torch.randn(n) for n in (4, 2, 2)]
    for index in range(3):
        separate.weight_loader(separate.weight, weights[index], index)
        separate.weight_loader(separate.bias, biases[index], index)
    fused.load_fused(fused.weight, torch.cat(weights))
    fused.load_fused(fused.bias, torch.cat(biases))
    torch.testing.assert_close(fused.weight, separate.weight, atol=0, rtol=0)
    torch.testing.assert_close(fused.bias, separate.bias, atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not hold the shards"):
        fused.load_fused(fused.weight, torch.randn(7, 8))


def test_scaled_embedding_and_soft_capped_head() -> None:
    embedding = VocabEmbedding(10, 4, scale=4**0.5)
    embedding.weight.data.normal_()
    ids = torch.tensor([3, 1])
    torch.testing.assert_close(embedding(ids), embedding.weight[ids] * 2.0)
    head = LMHead(10, 4, tied_to=embedding, soft_cap=2.0)
    hidden = torch.randn(2, 4) * 10
    logits = head(hidden)
    torch.testing.assert_close(logits, torch.tanh(F.linear(hidden, embedding.weight) / 2.0) * 2.0)
    assert logits.abs().max() <= 2.0 < F.linear(hidden, embedding.weight).abs().max()


def test_merged_linear_loads_each_shard_into_place() -> None:
    layer = Linear(8, [4, 2, 2], bias=True)
    weights = [torch.randn(n, 8) for n in (4, 2, 2)]
    biases = [torch.randn(n) for n in (4, 2, 2)]
    for index in (2, 0, 1):
        layer.weight_loader(layer.weight, weights[index], index)
        layer.weight_loader(layer.bias, biases[index], index)
    x = torch.randn(3, 8)
    expected = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="does not fit"):
        layer.weight_loader(layer.weight, torch.randn(3, 8), 1)
    with pytest.raises(ValueError, match="shard 3 of 3"):
        layer.weight_loader(layer.weight, weights[1], 3)


def test_lora_slot_sees_the_input_the_base_output_and_the_step_mapping() -> None:
    layer = Linear(4, 3)
    layer.weight_loader(layer.weight, torch.randn(3, 4))
    x = torch.randn(2, 4)
    base = layer(x)
    seen = []
    def adapter(inputs, out, mapping):
        seen.append(mapping)
        return out + inputs.sum(-1, keepdim=True)
    layer.lora_adapter = adapter
    # Outside a forward context, or in a step without adapters, the slot costs nothing.
    torch.testing.assert_close(layer(x), base)
    with set_forward_context(None, None):
        torch.testing.assert_close(layer(x), base)
    assert seen == []
    with set_forward_context(None, None, lora_mapping="the mapping"):
        torch.testing.assert_close(layer(x), base + x.sum(-1, keepdim=True))
    assert seen == ["the mapping"]


class PackedLinearMethod(LinearMethod):
    """A stand-in weight format: two output rows stored per packed row (summed on use)."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype) -> None:
        packed = nn.Parameter(torch.zeros(sum(output_sizes) // 2, input_size), requires_grad=False)
        set_weight_attrs(packed, {"output_dim": 0, "packed_dim": 0, "pack_factor": 2})
        layer.register_parameter("packed", packed)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.packed.repeat_interleave(2, dim=0), bias)


class FakeQuantConfig(QuantizationConfig):
    name = "fake"

    def __init__(self, bits: int) -> None:
        self.bits = bits

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> FakeQuantConfig:
        return cls(hf_quant_config.get("bits", 0))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod() if prefix.endswith("dense") else PackedLinearMethod()


def test_quantized_layout_shards_along_its_packed_output_dim() -> None:
    layer = Linear(3, [4, 2], quant_config=FakeQuantConfig(4), prefix="qkv")
    assert isinstance(layer.quant_method, PackedLinearMethod)
    layer.weight_loader(layer.packed, torch.ones(1, 3), 1)
    torch.testing.assert_close(layer.packed, torch.tensor([[0.0] * 3, [0.0] * 3, [1.0] * 3]))
    assert isinstance(Linear(3, 3, quant_config=FakeQuantConfig(4), prefix="dense").quant_method, UnquantizedLinearMethod)


@pytest.fixture
def fake_quant_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = get_plugin_manager().registry("quantization_methods")
    monkeypatch.setitem(registry._entries, "fake", Entry("fake", "test_layers:FakeQuantConfig", "tests"))


def quantized(method: str | None, **fields: Any) -> SimpleNamespace:
    if method is None:
        return SimpleNamespace()
    return SimpleNamespace(quantization_config={"quant_method": method, **fields})


def test_quantization_follows_the_checkpoint(fake_quant_registered: None) -> None:
    assert get_quantization_config(None, quantized(None)) is None
    assert get_quantization_config("none", quantized(None)) is None
    config = get_quantization_config(None, quantized("fake", bits=4))
    assert isinstance(config, FakeQuantConfig) and config.bits == 4
    assert get_quantization_config("fake", quantized("fake", bits=4)).bits == 4
    assert get_quantization_config("fake", quantized(None)).bits == 0


def test_quantization_mismatches_are_clear_errors(fake_quant_registered: None) -> None:
    with pytest.raises(ValueError, match="does not match the checkpoint's quant_method 'fake'"):
        get_quantization_config("awq", quantized("fake"))
    with pytest.raises(ValueError, match="quantization='none'.*quantized with 'fake'"):
        get_quantization_config("none", quantized("fake"))
    with pytest.raises(PluginError, match="unknown quantization_methods 'mystery'.*known:.*fake"):
        get_quantization_config(None, quantized("mystery"))


def test_lm_head_tied_to_the_embedding_shares_its_weight() -> None:
    embedding = VocabEmbedding(10, 4)
    embedding.weight.data.normal_()
    head = LMHead(10, 4, tied_to=embedding)
    hidden = torch.randn(3, 4, dtype=torch.float64).float()
    torch.testing.assert_close(head(hidden), hidden @ embedding.weight.T)
    assert head.weight is embedding.weight and head(hidden).dtype == torch.float32
    torch.testing.assert_close(embedding(torch.tensor([2, 7])), embedding.weight[[2, 7]])


def test_batch_layout_fills_every_field() -> None:
    # A chunk at positions 3..5 (blocks 7, 2), a decode at position 4 (blocks 5, 1), a new prompt.
    layout = build_batch_layout([([7, 2], 3, 3), ([5, 1], 4, 1), ([4], 0, 2)], 4, "cpu")
    assert (layout.num_reqs, layout.num_tokens) == (3, 6)
    assert layout.query_start_loc.tolist() == [0, 3, 4, 6]
    assert layout.seq_lens.tolist() == [6, 5, 2]
    assert layout.num_computed_tokens.tolist() == [3, 4, 0]
    assert layout.block_tables.tolist() == [[7, 2], [5, 1], [4, 0]]
    assert layout.positions.tolist() == [3, 4, 5, 4, 0, 1]
    assert layout.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4, 2 * 4 + 1, 1 * 4, 4 * 4, 4 * 4 + 1]
    assert (layout.max_query_len, layout.max_seq_len, layout.block_size) == (3, 6, 4)
    assert (layout.query_lens_list, layout.seq_lens_list) == ([3, 1, 2], [6, 5, 2])
    dtypes = [layout.query_start_loc.dtype, layout.seq_lens.dtype, layout.num_computed_tokens.dtype,
              layout.block_tables.dtype, layout.slot_mapping.dtype, layout.positions.dtype]
    assert dtypes == [torch.int32] * 4 + [torch.int64] * 2


def test_batch_layout_refuses_too_few_blocks() -> None:
    with pytest.raises(ValueError, match="request 1 needs 9 KV slots but its 2 blocks of 4 hold only 8"):
        build_batch_layout([([0], 0, 3), ([1, 2], 8, 1)], 4, "cpu")


def test_empty_batch_layout() -> None:
    layout = build_batch_layout([], 16, "cpu")
    assert layout.num_tokens == 0 and layout.block_tables.shape == (0, 1)
