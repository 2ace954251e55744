"""The fused MoE layer: routing, the torch path (tokens grouped by expert) against a plain loop
over tokens, and the Triton kernel against the torch path (interpreted on the CPU, in the kernel
worker, as ``test_triton_kernels.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pagedserve.core.layers import cpu_gemm
from pagedserve.plugins.moe import FusedMoE, cpu_experts, route_top_k
from pagedserve.plugins.moe.layer import grouped_experts
from pagedserve.plugins.quant.int8 import Int8Config
from pagedserve.plugins.quant.int8_moe import quantize_experts
from triton_worker import KernelWorker

HERE = __name__
DTYPES = {"float32": torch.float32, "float16": torch.float16}
TOLERANCE = {"float32": 1e-5, "float16": 5e-3}


def per_token_reference(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Each token through each of its experts, one at a time, in float64."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    intermediate = w2.shape[2]
    for t in range(hidden.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate_up = w13[e].double() @ hidden[t].double()
            act = F.silu(gate_up[:intermediate]) * gate_up[intermediate:]
            out[t] += weights[t, slot].double() * (w2[e].double() @ act)
    return out


def make_inputs(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int, seed: int
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=generator) / intermediate**0.5
    logits = torch.randn(num_tokens, num_experts, generator=generator) * 2
    weights, ids = route_top_k(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def test_routing_picks_the_top_k_and_renormalizes() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 3.5]])
    weights, ids = route_top_k(logits, 2, renormalize=True)
    assert ids.tolist() == [[1, 2], [3, 0]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    raw, _ = route_top_k(logits, 2, renormalize=False)
    torch.testing.assert_close(raw, torch.softmax(logits, -1).topk(2).values)


@pytest.mark.parametrize(("num_tokens", "top_k"), [(1, 1), (7, 2), (33, 3)])
def test_grouped_torch_path_matches_a_loop_over_tokens(num_tokens: int, top_k: int) -> None:
    x, w13, w2, weights, ids = make_inputs(num_tokens, 6, top_k, 16, 24, seed=num_tokens)
    out = grouped_experts(x, w13, w2, weights, ids, F.silu)
    torch.testing.assert_close(out.double(), per_token_reference(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_layer_loads_expert_by_expert_and_refuses_quantization() -> None:
    layer = FusedMoE(3, 2, 8, 4, prefix="model.layers.0.mlp.experts")
    gate, up, down = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 4)
    layer.weight_loader(layer.w13_weight, gate, 2, 0)
    layer.weight_loader(layer.w13_weight, up, 2, 1)
    layer.weight_loader(layer.w2_weight, down, 2, None)
    torch.testing.assert_close(layer.w13_weight[2], torch.cat([gate, up]))
    torch.testing.assert_close(layer.w2_weight[2], down)
    with pytest.raises(ValueError, match="expert 3 of 3"):
        layer.weight_loader(layer.w2_weight, down, 3, None)
    assert len(layer.needed_shards("w13_weight")) == 6

    class FakeFormat:
        name = "awq"

        def get_moe_method(self, layer: FusedMoE, prefix: str) -> None:
            return None  # a format that cannot hold experts

    with pytest.raises(ValueError, match="experts.*quantization 'awq'.*unquantized checkpoint"):
        FusedMoE(3, 2, 8, 4, quant_config=FakeFormat(), prefix="model.layers.0.mlp.experts")  # type: ignore[arg-type]


def case_fused_moe(
    dtype: str, num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int, seed: int = 0
) -> dict[str, Any]:
    """The Triton kernel against the torch path (float32, the same rounded inputs)."""
    from pagedserve.plugins.moe import triton_moe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w13, w2, weights, ids = make_inputs(num_tokens, num_experts, top_k, hidden, intermediate, seed)
    x, w13, w2 = (t.to(DTYPES[dtype]) for t in (x, w13, w2))
    out = triton_moe.fused_experts(x.to(device), w13.to(device), w2.to(device), weights.to(device), ids.to(device))
    expected = grouped_experts(x.float(), w13.float(), w2.float(), weights, ids, F.silu)
    sorted_ids, block_experts = triton_moe.align_by_expert(ids, num_experts)
    valid = sorted_ids[sorted_ids < ids.numel()]
    blocks_ok = all(
        int(ids.flatten()[pair]) == int(block_experts[slot // triton_moe.BLOCK_M])
        for slot, pair in enumerate(sorted_ids.tolist())
        if pair < ids.numel()
    )
    diff = (out.cpu().float() - expected).abs().max().item()
    return {
        "rel_err": diff / expected.abs().max().item(),
        "every_pair_once": sorted(valid.tolist()) == list(range(ids.numel())),
        "blocks_one_expert": blocks_ok,
    }


@pytest.fixture(scope="module")
def worker() -> Iterator[KernelWorker]:
    kernel_worker = KernelWorker()
    yield kernel_worker
    kernel_worker.close()


@pytest.mark.parametrize(
    ("dtype", "num_tokens", "num_experts", "top_k", "hidden", "intermediate"),
    [
        ("float32", 1, 4, 1, 32, 48),  # a single decode token, top-1
        ("float32", 37, 8, 2, 64, 96),  # uneven expert loads, sizes off the block grid
        ("float16", 20, 4, 2, 64, 64),
        ("float32", 5, 16, 4, 32, 32),  # more experts than tokens: most get none
    ],
)
def test_triton_fused_moe_matches_the_torch_path(
    worker: KernelWorker, dtype: str, num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int
) -> None:
    case = {"num_tokens": num_tokens, "num_experts": num_experts, "top_k": top_k, "hidden": hidden,
            "intermediate": intermediate}  # fmt: skip
    result = worker.run(HERE, "fused_moe", dtype=dtype, **case)
    print(f"{case} {dtype}: rel_err={result['rel_err']:.2e}")
    assert result["every_pair_once"] and result["blocks_one_expert"]
    assert result["rel_err"] < TOLERANCE[dtype]


def test_grouped_torch_path_traces_into_one_graph_in_float32() -> None:
    """No host sync or Python loop over experts (fullgraph), and float32 through the grouped
    matmul's tracing (its meta function takes bfloat16 only)."""
    x, w13, w2, weights, ids = make_inputs(9, 4, 2, 16, 24, seed=3)
    traced = torch.compile(grouped_experts, backend="eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(traced(x, w13, w2, weights, ids, F.silu), grouped_experts(x, w13, w2, weights, ids, F.silu))


needs_onednn_bf16 = pytest.mark.skipif(not cpu_experts.onednn_available(), reason="no bf16 oneDNN kernels on this CPU")


def loaded_layer(w13: torch.Tensor, w2: torch.Tensor, top_k: int, dtype: torch.dtype, quant_config: Any = None) -> FusedMoE:
    """A ``FusedMoE`` holding ``w13``/``w2`` in ``dtype``, processed as the loader does."""
    num_experts, double_intermediate, hidden = w13.shape
    layer = FusedMoE(num_experts, top_k, hidden, double_intermediate // 2, quant_config=quant_config, params_dtype=dtype)
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@needs_onednn_bf16
@pytest.mark.parametrize(("num_tokens", "top_k"), [(1, 2), (13, 2), (40, 1)])
def test_bf16_experts_in_onednn_layout_match_the_grouped_path(num_tokens: int, top_k: int) -> None:
    """Packed once after loading (the stacked weights dropped), each expert's rows through
    oneDNN: the grouped path's result on the same bf16 weights, within bf16 rounding."""
    x, w13, w2, _, _ = make_inputs(num_tokens, 6, top_k, 64, 48, seed=num_tokens)
    logits = torch.randn(num_tokens, 6, generator=torch.Generator().manual_seed(1))
    layer = loaded_layer(w13, w2, top_k, torch.bfloat16)
    assert layer.cpu_weights is not None and not hasattr(layer, "w13_weight")
    out = layer(x.bfloat16(), logits)
    weights, ids = route_top_k(logits, top_k, renormalize=True)
    expected = per_token_reference(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=0.03, rtol=0.03)


def oneDNN_wins_from(rows_from: int | None):
    return lambda weight, packed, rows: (1.0, 0.5 if rows_from is not None and rows >= rows_from else 2.0)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize(("num_tokens", "top_k"), [(1, 2), (13, 2), (40, 1)])
def test_float32_experts_packed_where_oneDNN_wins_match_the_grouped_path(monkeypatch, num_tokens: int, top_k: int) -> None:
    """float32 experts go to oneDNN's layout when the timing at load finds it faster from a
    decode step's few rows an expert (here: injected timings), with the grouped path's result."""
    x, w13, w2, _, _ = make_inputs(num_tokens, 6, top_k, 64, 48, seed=num_tokens)
    logits = torch.randn(num_tokens, 6, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(cpu_gemm, "time_both", oneDNN_wins_from(2))
    layer = loaded_layer(w13, w2, top_k, torch.float32)
    assert layer.cpu_weights is not None and not hasattr(layer, "w13_weight")
    weights, ids = route_top_k(logits, top_k, renormalize=True)
    out = layer(x, logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, grouped_experts(x, w13, w2, weights, ids, F.silu), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("rows_from", [8, None])
def test_float32_experts_stay_grouped_where_oneDNN_does_not_win_at_few_rows(monkeypatch, rows_from) -> None:
    _, w13, w2, _, _ = make_inputs(4, 6, 2, 64, 48, seed=0)
    monkeypatch.setattr(cpu_gemm, "time_both", oneDNN_wins_from(rows_from))
    layer = loaded_layer(w13, w2, 2, torch.float32)
    assert layer.cpu_weights is None and layer.w13_weight.shape == w13.shape


@pytest.mark.parametrize(("num_tokens", "top_k"), [(1, 2), (13, 2), (33, 3)])
def test_int8_experts_match_their_dequantized_weights(num_tokens: int, top_k: int) -> None:
    """--quantization int8 holds the experts in int8 with a scale per expert row; the CPU kernel
    gives what the dequantized weights give (activations rounded to its dtype)."""
    x, w13, w2, _, _ = make_inputs(num_tokens, 6, top_k, 64, 48, seed=num_tokens)
    logits = torch.randn(num_tokens, 6, generator=torch.Generator().manual_seed(2))
    layer = loaded_layer(w13, w2, top_k, torch.float32, Int8Config())
    assert layer.w13_weight.dtype == torch.int8 and layer.w2_weight.dtype == torch.int8
    assert layer.cpu_weights is not None
    out = layer(x, logits)
    q13, s13 = quantize_experts(w13)
    q2, s2 = quantize_experts(w2)
    weights, ids = route_top_k(logits, top_k, renormalize=True)
    expected = per_token_reference(x, q13 * s13.unsqueeze(-1), q2 * s2.unsqueeze(-1), weights, ids)
    assert out.dtype == torch.float32
    tolerance = 0.03 if layer.w13_scale.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    # Away from the CPU kernel (as on CUDA), the dequantized weights through the stacked path.
    layer.cpu_weights = None
    torch.testing.assert_close(layer(x, logits).double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("layout", ["int8", "onednn-bf16"])
def test_cpu_experts_compile_as_one_graph(layout: str) -> None:
    """Each projection's per-expert loop is one opaque op (``moe_cpu_experts_matmul``), the
    routing, gather, activation and weighted sum traced around it: no graph break, no
    data-dependent shape, the eager result."""
    if layout == "onednn-bf16" and not cpu_experts.onednn_available():
        pytest.skip("no native bf16 matmul (oneDNN) on this CPU")
    x, w13, w2, _, _ = make_inputs(9, 4, 2, 64, 48, seed=3)
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    dtype, quant = (torch.float32, Int8Config()) if layout == "int8" else (torch.bfloat16, None)
    layer = loaded_layer(w13.to(dtype), w2.to(dtype), 2, dtype, quant)
    assert layer.cpu_weights is not None
    layer.cpu_dense = None  # the routed path, whatever the timing chose (below: the dense one)
    targets = compiled_call_targets(layer, x.to(dtype), logits.to(dtype), dynamic=True)
    assert sum("moe_cpu_experts_matmul" in target for target in targets) == 2, targets


def compiled_call_targets(layer: FusedMoE, x: torch.Tensor, logits: torch.Tensor, dynamic: bool) -> list[str]:
    """The functions the layer's one graph calls (fullgraph), its result checked against eager."""
    graphs: list[torch.fx.GraphModule] = []

    def record(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        graphs.append(graph)
        return graph

    compiled = torch.compile(layer, backend=record, fullgraph=True, dynamic=dynamic)
    torch.testing.assert_close(compiled(x, logits), layer(x, logits), rtol=0, atol=0)
    return [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]


def dense_wins_at(*tokens: int):
    """A ``dense_experts_for`` timer under which the dense path wins at these step sizes."""
    return lambda step_tokens, routed, dense: (1.0, 0.5 if step_tokens in tokens else 2.0)


def packed_layer(w13: torch.Tensor, w2: torch.Tensor, top_k: int, dtype: torch.dtype, monkeypatch,
                 wins: tuple[int, ...]) -> FusedMoE:
    """A loaded CPU layer in oneDNN's layout whose dense path won at ``wins`` (injected timings)."""
    monkeypatch.setattr(cpu_gemm, "time_both", oneDNN_wins_from(1))  # float32 experts packed too
    real = cpu_experts.dense_experts_for
    monkeypatch.setattr(cpu_experts, "dense_experts_for",
                        lambda *args: real(*args, timer=dense_wins_at(*wins)))
    return loaded_layer(w13.to(dtype), w2.to(dtype), top_k, dtype)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_onednn_bf16)])
@pytest.mark.parametrize(("num_tokens", "top_k"), [(2, 2), (3, 2), (16, 1), (32, 3)])
def test_dense_experts_give_the_routed_result(monkeypatch, dtype: torch.dtype, num_tokens: int, top_k: int) -> None:
    """All experts as one matmul a projection, the unchosen weighted by zero: each token's
    weighted sum over its own experts, as the per-token reference computes it."""
    x, w13, w2, _, _ = make_inputs(num_tokens, 6, top_k, 64, 48, seed=num_tokens)
    logits = torch.randn(num_tokens, 6, generator=torch.Generator().manual_seed(4))
    layer = packed_layer(w13, w2, top_k, dtype, monkeypatch, wins=(1, 2, 4, 8, 16, 32))
    assert layer.cpu_dense is not None and layer.cpu_dense.tokens == (2, 32)
    weights, ids = route_top_k(logits, top_k, renormalize=True)
    expected = per_token_reference(x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)
    out = layer(x.to(dtype), logits)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.03
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize(("wins", "tokens"), [((2, 4, 8, 32), (2, 8)), ((2,), (2, 2)), ((1,), None), ((), None), ((16, 32), (16, 32))])
def test_dense_experts_cover_the_longest_run_of_step_sizes_they_won(monkeypatch, wins, tokens) -> None:
    _, w13, w2, _, _ = make_inputs(4, 6, 2, 64, 48, seed=0)
    layer = packed_layer(w13, w2, 2, torch.float32, monkeypatch, wins=wins)
    assert (layer.cpu_dense.tokens if layer.cpu_dense else None) == tokens
    if tokens is not None:
        first, last = tokens
        assert layer.cpu_dense.covers(first) and layer.cpu_dense.covers(last)
        assert not layer.cpu_dense.covers(first - 1) and not layer.cpu_dense.covers(last + 1)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
def test_large_experts_get_no_dense_copy(monkeypatch) -> None:
    """Above ``DENSE_MAX_BYTES`` a layer's experts are not copied (nor timed), whatever a timing
    would say."""
    _, w13, w2, _, _ = make_inputs(4, 6, 2, 64, 48, seed=0)
    monkeypatch.setattr(cpu_experts, "DENSE_MAX_BYTES", (w13.numel() + w2.numel()) * 4 - 1)
    layer = packed_layer(w13, w2, 2, torch.float32, monkeypatch, wins=(1, 2, 4, 8, 16, 32))
    assert layer.cpu_weights is not None and layer.cpu_dense is None


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
def test_dense_experts_compile_to_the_packed_matmul_op(monkeypatch) -> None:
    """Under torch.compile the dense path is two ``pagedserve::packed_linear`` ops with the
    routing, activation and scaling traced around them, and the eager result."""
    x, w13, w2, _, _ = make_inputs(4, 6, 2, 64, 48, seed=3)
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    layer = packed_layer(w13, w2, 2, torch.float32, monkeypatch, wins=(2, 4, 8))
    targets = compiled_call_targets(layer, x, logits, dynamic=False)
    assert sum("packed_linear" in target for target in targets) == 2, targets
    assert not any("moe_cpu_experts_matmul" in target for target in targets), targets


def test_the_dense_timing_flushes_the_caches_and_times_both_paths() -> None:
    calls: list[str] = []
    routed, dense = cpu_experts.time_routed_and_dense(4, lambda: calls.append("routed"), lambda: calls.append("dense"),
                                                      repeats=2)
    assert calls == ["routed", "dense"] * 2 and 0 < routed < 1 and 0 < dense < 1
    assert cpu_experts.last_level_cache_bytes() > 0
