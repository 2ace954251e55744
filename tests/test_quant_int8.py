"""``quantization="int8"``: int8 weight-only quantization at load time (plugins/quant/int8.py).

The matmul against the dequantized weights it stands for, and its quality check: held-out
perplexity of the bundled model within 1% of float32, both computed here through the engine
(prompt logprobs), the LM head and the tied embedding included; and the same for the experts of a
mixture-of-experts model (the bundled model upcycled into a Mixtral).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve import LLM, SamplingParams
from pagedserve.assets import DEFAULT_MODEL, bundled_model_path
from pagedserve.assets.corpus import eval_windows, split_files, token_stream
from pagedserve.core.layers.linear import Linear
from pagedserve.plugins.moe import FusedMoE
from pagedserve.plugins.quant.int8 import (
    Int8Config,
    CPU_HAS_INT8_DOT,
    int8_cpu_kernel,
    int8_matmul,
    quantize_int8,
    quantize_rows,
)

#: Held-out windows scored (of 128 tokens: about 4k predicted tokens per model).
NUM_WINDOWS = 32
CONTEXT = 128


def test_quantize_int8_rounds_each_output_channel_to_its_own_scale() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    weight[5] = 0.0
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert q.abs().amax(dim=1)[torch.arange(48) != 5].eq(127).all()  # each row uses its full range
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-12).all()
    assert q[5].eq(0).all() and torch.isfinite(scale).all()


@pytest.mark.parametrize(
    ("rows", "kernel"),
    [(1, "weight_only"), (3, "weight_only"), (5, "int8_gemm"), (15, "int8_gemm"), (70, "dequantize")],
)
def test_int8_matmul_matches_the_dequantized_weight(rows: int, kernel: str) -> None:
    """The dequantized weight's result, by each of ``int8_cpu_kernel``'s kernels (``2 * rows``
    rows of a 96 x 64 weight); with the int8 GEMM (where the CPU has int8 dot products) on the
    activations quantized per row, within 1% of the unquantized activations' in norm."""
    if kernel == "int8_gemm" and not CPU_HAS_INT8_DOT:
        kernel = "weight_only"
    torch.manual_seed(rows)
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(2, rows, 64)
    q, scale = quantize_int8(weight)
    dequantized = (q.float() * scale[:, None]).T
    scale_dtype = torch.bfloat16 if rows in (3, 5) else torch.float32
    activations = x
    assert int8_cpu_kernel(2 * rows, q) == kernel
    if kernel == "int8_gemm":
        q_rows, row_scale = quantize_rows(x.reshape(-1, 64).to(scale_dtype))
        assert q_rows.dtype == torch.int8 and q_rows.abs().amax(dim=1).eq(127).all()
        activations = (q_rows.float() * row_scale).view_as(x)
        unquantized = x @ dequantized + bias
        assert ((activations @ dequantized + bias - unquantized).norm() / unquantized.norm()) < 0.01
    expected = activations @ dequantized + bias
    out = int8_matmul(x, q, scale.to(scale_dtype), bias)
    assert out.dtype == x.dtype and out.shape == (2, rows, 96)
    # bfloat16 activations (where the CPU has them) round to 8 bits of mantissa.
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not CPU_HAS_INT8_DOT, reason="the int8 GEMM needs int8 dot products (VNNI/AMX)")
def test_compiled_int8_gemm_is_one_opaque_op_with_the_eager_result() -> None:
    """Under torch.compile the int8 GEMM and its rescale are one op (``pagedserve::int8_gemm``),
    so inductor cannot inline the rescale into a consumer that reduces over another axis (the
    traced decode attention recomputed it per key position); same values as eager, no break."""
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(96, 64))
    scale = scale.to(torch.bfloat16)
    x = torch.randn(16, 64)
    assert int8_cpu_kernel(16, q) == "int8_gemm"
    graphs: list[torch.fx.GraphModule] = []

    def record(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        graphs.append(graph)
        return graph

    compiled = torch.compile(lambda x: int8_matmul(x, q, scale, None), backend=record, fullgraph=True)
    torch.testing.assert_close(compiled(x), int8_matmul(x, q, scale, None), rtol=0, atol=0)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert any("pagedserve.int8_gemm" in target for target in targets), targets
    assert not any("_int_mm" in target for target in targets), targets


def test_int8_refuses_a_checkpoint_that_is_already_quantized() -> None:
    with pytest.raises(ValueError, match="already quantized"):
        Int8Config.from_config({"quant_method": "gptq", "bits": 4})


def held_out_perplexity(llm: LLM, windows: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for window, output in zip(windows, outputs):
        for position in range(1, len(window)):
            nll -= output.prompt_logprobs[position][window[position]].logprob
            count += 1
    return math.exp(nll / count)


def held_out_windows(llm: LLM) -> list[list[int]]:
    tokenizer = llm.get_tokenizer()
    stream = token_stream(
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        split_files()[1],
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    return [w for w in eval_windows(stream, CONTEXT) if len(w) == CONTEXT][:NUM_WINDOWS]


@pytest.mark.slow
def test_int8_held_out_perplexity_is_within_one_percent_of_float32() -> None:
    dense = LLM(DEFAULT_MODEL, dtype="float32", max_model_len=CONTEXT + 8)
    windows = held_out_windows(dense)
    reference = held_out_perplexity(dense, windows)
    del dense
    quantized = LLM(DEFAULT_MODEL, dtype="float32", quantization="int8", max_model_len=CONTEXT + 8)
    model = quantized.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    head = model.lm_head
    assert head.qweight.dtype == torch.int8 and head.weight.dtype == torch.float32  # the tied embedding stays
    perplexity = held_out_perplexity(quantized, windows)
    assert reference < 1000  # a trained model, not noise
    assert abs(perplexity / reference - 1) < 0.01, (perplexity, reference)


def upcycled_mixtral(folder: Path, num_experts: int = 4, noise: float = 0.05) -> Path:
    """The bundled model as a Mixtral (sparse upcycling): each layer's MLP copied into
    ``num_experts`` experts, each copy's weights scaled by its own ``1 + noise * N(0, 1)`` so the
    experts differ, a random router, top-2; a trained MoE to measure quantized experts on."""
    source = bundled_model_path(DEFAULT_MODEL)
    config = json.loads((source / "config.json").read_text())
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=num_experts,
                  num_experts_per_tok=2, dtype="float32", sliding_window=None)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        tensor = tensor.float()
        if ".mlp." not in name:
            tensors[name] = tensor
            continue
        prefix, proj = name.split(".mlp.")
        checkpoint_name = {"gate_proj.weight": "w1", "up_proj.weight": "w3", "down_proj.weight": "w2"}[proj]
        for e in range(num_experts):
            scaled = tensor * (1 + noise * torch.randn(tensor.shape, generator=generator))
            tensors[f"{prefix}.block_sparse_moe.experts.{e}.{checkpoint_name}.weight"] = scaled
        if proj == "gate_proj.weight":
            router = torch.randn(num_experts, tensor.shape[1], generator=generator) * 0.05
            tensors[f"{prefix}.block_sparse_moe.gate.weight"] = router
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.mark.slow
def test_int8_experts_held_out_perplexity_is_within_one_percent_of_float32(tmp_path: Path) -> None:
    """The same check for a mixture of experts, every expert quantized (and the dense layers)."""
    model = str(upcycled_mixtral(tmp_path / "mixtral"))
    dense = LLM(model, dtype="float32", max_model_len=CONTEXT + 8)
    windows = held_out_windows(dense)[: NUM_WINDOWS // 2]  # about 2k predicted tokens: test time
    reference = held_out_perplexity(dense, windows)
    del dense
    quantized = LLM(model, dtype="float32", quantization="int8", max_model_len=CONTEXT + 8)
    experts = [m for m in quantized.engine.runner.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.w13_weight.dtype == torch.int8 and m.w2_weight.dtype == torch.int8 for m in experts)
    perplexity = held_out_perplexity(quantized, windows)
    print(f"upcycled Mixtral held-out perplexity: float32 {reference:.3f}, int8 experts {perplexity:.3f}")
    assert reference < 1000  # still a trained model, not noise
    assert abs(perplexity / reference - 1) < 0.01, (perplexity, reference)
