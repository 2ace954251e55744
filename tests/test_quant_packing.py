"""Bit layouts against hand-worked examples, the AWQ/GPTQ layer methods against plain dequantization,
and GPTQ's algorithm against round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import AWQ_ORDER, unpack_cols, unpack_rows

from pagedserve.core.layers.linear import Linear
from pagedserve.plugins.quant.awq import AWQConfig
from pagedserve.plugins.quant.gptq import GPTQConfig
from pagedserve.plugins.quant.gptq_algorithm import group_params, gptq_quantize, quantize_column
from pagedserve.plugins.quant.gptq_quantize import classic_tensors
from pagedserve.plugins.quant.packing import (
    awq_to_sequential,
    pack_int32,
    sequential_to_awq,
    unpack_int32,
)


def as_unsigned(words: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in words.flatten().tolist()]


def test_hand_worked_words() -> None:
    # Eight values 0..7 packed sequentially: value i in bits 4i..4i+3, read from the top nibble down.
    assert as_unsigned(pack_int32(torch.arange(8).view(1, 8), 4, 1)) == [0x76543210]
    # AWQ: nibble i holds column AWQ_ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7 -> 0x75316420.
    assert as_unsigned(pack_int32(sequential_to_awq(torch.arange(8).view(1, 8)), 4, 1)) == [0x75316420]
    # GPTQ's classic symmetric 4-bit zeros: zero 8 stored as 7 in all eight nibbles.
    assert as_unsigned(pack_int32(torch.full((1, 8), 7), 4, 1)) == [0x77777777]
    # 8 bits, packed along rows (GPTQ's qweight): rows 0..3 of a column -> bytes 0..3.
    assert as_unsigned(pack_int32(torch.tensor([[1], [2], [3], [255]]), 8, 0)) == [0xFF030201]
    # Negative int32 words (top bit set) unpack to the same values.
    assert unpack_int32(torch.tensor([[0x75316420 - (1 << 32) + 0x80000000]]), 4, 1).tolist()[0][-1] == 15


@pytest.mark.parametrize(("bits", "dim"), [(4, 0), (4, 1), (8, 0), (8, 1)])
def test_pack_round_trip_matches_the_documented_unpacking(bits: int, dim: int) -> None:
    values = torch.randint(0, 1 << bits, (16, 24))
    words = pack_int32(values, bits, dim)
    assert words.dtype == torch.int32 and words.is_contiguous()
    assert torch.equal(unpack_int32(words, bits, dim), values)
    reference = unpack_rows(words, bits) if dim == 0 else unpack_cols(words, bits)
    assert torch.equal(reference, values)


def test_awq_order_round_trip_matches_the_documented_unpacking() -> None:
    values = torch.randint(0, 16, (16, 24))
    awq = pack_int32(sequential_to_awq(values), 4, 1)
    assert torch.equal(unpack_cols(awq, 4, AWQ_ORDER), values)
    assert torch.equal(awq_to_sequential(unpack_int32(awq, 4, 1)), values)


def quantized_layer(
    config, input_size: int, output_sizes: list[int], tensors: list[dict[str, torch.Tensor]]
) -> Linear:
    """A merged Linear loaded shard by shard from per-shard checkpoint tensors."""
    layer = Linear(input_size, output_sizes, quant_config=config, prefix="layer")
    for shard, shard_tensors in enumerate(tensors):
        for name, tensor in shard_tensors.items():
            layer.weight_loader(getattr(layer, name), tensor, shard)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_layer_matches_plain_dequantization(group: int) -> None:
    K, sizes = 256, [64, 32]
    shards, dense = [], []
    for n in sizes:
        q, z = torch.randint(0, 16, (K, n)), torch.randint(0, 16, (K // group, n))
        s = torch.rand(K // group, n) / 10
        shards.append({"qweight": pack_int32(sequential_to_awq(q), 4, 1),
                       "qzeros": pack_int32(sequential_to_awq(z), 4, 1), "scales": s.half()})
        dense.append((q - z.repeat_interleave(group, 0)) * s.half().float().repeat_interleave(group, 0))
    config = AWQConfig.from_config({"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm"})
    layer = quantized_layer(config, K, sizes, shards)
    x = torch.randn(5, K)
    torch.testing.assert_close(layer(x), x @ torch.cat(dense, 1))


@pytest.mark.parametrize(("bits", "group", "v2"), [(4, 32, False), (8, 64, False), (4, -1, True)])
def test_gptq_act_order_layer_matches_plain_dequantization(bits: int, group: int, v2: bool) -> None:
    K, sizes = 128, [32, 64]
    g = K if group == -1 else group
    perm = torch.randperm(K)
    g_idx = (torch.argsort(perm) // g).int()  # act-order: feature perm[j] is the j-th quantized
    shards, dense = [], []
    for n in sizes:
        q, z = torch.randint(0, 1 << bits, (K, n)), torch.randint(1, 1 << bits, (K // g, n))
        s = torch.rand(K // g, n) / 10
        shards.append({"qweight": pack_int32(q, bits, 0), "qzeros": pack_int32(z - (0 if v2 else 1), bits, 1),
                       "scales": s.half(), "g_idx": g_idx})
        dense.append((q - z[g_idx.long()]) * s.half().float()[g_idx.long()])
    settings = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": True}
    config = GPTQConfig.from_config({**settings, "checkpoint_format": "gptq_v2" if v2 else "gptq"})
    layer = quantized_layer(config, K, sizes, shards)
    # One group needs no reordering; several groups in act-order do.
    assert (layer.input_perm is None) == (group == -1) and not hasattr(layer, "g_idx")
    x = torch.randn(3, K)
    # The gathered columns sum in another order than the reference: float rounding only.
    torch.testing.assert_close(layer(x), x @ torch.cat(dense, 1), rtol=1e-4, atol=1e-4)


def test_gptq_merged_shards_must_share_their_act_order() -> None:
    config = GPTQConfig.from_config({"quant_method": "gptq", "bits": 4, "group_size": 32})
    layer = Linear(64, [32, 32], quant_config=config, prefix="qkv")
    layer.weight_loader(layer.g_idx, torch.randperm(64).int() // 32, 0)
    with pytest.raises(ValueError, match="different act-order g_idx"):
        layer.weight_loader(layer.g_idx, torch.arange(64).int() // 32, 1)


def correlated_inputs(n: int, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=generator) @ torch.randn(k, k, generator=generator) * 0.3 + torch.randn(
        k, generator=generator
    )


@pytest.mark.parametrize(("sym", "group", "act_order"), [(True, 32, True), (False, -1, False), (False, 64, True)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(sym: bool, group: int, act_order: bool) -> None:
    X = correlated_inputs(1024, 128)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    result = gptq_quantize(W, 2 * X.T @ X / len(X), 4, group, act_order, sym, min_zero=0 if sym else 1)
    g = 128 if group == -1 else group
    rtn = torch.empty_like(W)
    for start in range(0, 128, g):
        cols = W[:, start : start + g]
        scale, zero = group_params(cols, 4, sym, 0 if sym else 1)
        scale = scale.half().float()[:, None]
        rtn[:, start : start + g] = scale * (quantize_column(cols, scale, zero[:, None], 4) - zero[:, None])
    gptq_error = ((X @ (W - result.dequantized()).T) ** 2).mean()
    rtn_error = ((X @ (W - rtn).T) ** 2).mean()
    assert gptq_error < 0.6 * rtn_error
    # The classic format's stored zero - 1 never wraps; the packed tensors decode to the result.
    assert int(result.zeros.min()) >= 1 and int(result.values.max()) <= 15
    tensors = {f"l.{k}": v for k, v in classic_tensors(result, 4).items()}
    torch.testing.assert_close(
        unpack_rows(tensors["l.qweight"], 4).T, result.values, check_dtype=False
    )
    torch.testing.assert_close(unpack_cols(tensors["l.qzeros"], 4) + 1, result.zeros, check_dtype=False)


def test_asymmetric_group_params_keep_zero_positive_for_the_classic_format() -> None:
    positive = torch.tensor([[0.0, 0.5, 1.5, 3.0]])
    scale, zero = group_params(positive, 4, sym=False, min_zero=1)
    assert zero.item() == 1
    assert scale.item() * (15 - 1) == pytest.approx(3.0)  # the maximum stays representable
