"""Dense CPU matmuls through oneDNN on prepacked weights: the same results as ``F.linear``, the
per-shape choice made from the timings, and an engine that packs every layer still giving
transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve import LLM, SamplingParams
from pagedserve.core.layers import cpu_gemm
from pagedserve.core.layers.embedding import LMHead, VocabEmbedding
from pagedserve.core.layers.linear import Linear
from prompts import CODE_PROMPTS

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")


def faster(packed_from: int | None) -> cpu_gemm.Timer:
    """A timer under which oneDNN wins from ``packed_from`` rows (None: never)."""
    return lambda weight, packed, rows: (1.0, 0.5 if packed_from is not None and rows >= packed_from else 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 17, 64])
def test_packed_linear_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    x = torch.randn(rows, 80, generator=generator).to(dtype)
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 2e-2}
    packed = cpu_gemm.pack(weight)
    torch.testing.assert_close(cpu_gemm.packed_linear(x, packed, bias), F.linear(x, weight, bias), **tolerance)
    torch.testing.assert_close(cpu_gemm.packed_linear(x, packed, None), F.linear(x, weight), **tolerance)


def test_packed_linear_takes_strided_and_batched_inputs() -> None:
    weight = torch.randn(64, 48)
    packed = cpu_gemm.pack(weight)
    strided = torch.randn(6, 96)[:, ::2]
    batched = torch.randn(2, 3, 48)
    torch.testing.assert_close(cpu_gemm.packed_linear(strided, packed, None), F.linear(strided, weight))
    torch.testing.assert_close(cpu_gemm.packed_linear(batched, packed, None), F.linear(batched, weight))


@pytest.mark.parametrize("packed_from, expected", [(1, 1), (4, 4), (16, 16), (None, None)])
def test_packed_from_rows_is_the_fewest_rows_oneDNN_wins_from(packed_from: int | None, expected: int | None) -> None:
    weight = torch.randn(8, 8)
    assert cpu_gemm.packed_from_rows(weight, cpu_gemm.pack(weight), faster(packed_from)) == expected


def test_a_win_below_a_loss_does_not_count() -> None:
    """oneDNN faster at 1 row but slower at 16: the layer stays on MKL (a threshold is a suffix)."""
    weight = torch.randn(8, 8)
    timer = lambda weight, packed, rows: (1.0, 0.5 if rows == 1 else 2.0)  # noqa: E731
    assert cpu_gemm.packed_from_rows(weight, cpu_gemm.pack(weight), timer) is None


def small_model(tied: bool) -> torch.nn.Module:
    model = torch.nn.Module()
    model.embed = VocabEmbedding(50, 32)
    model.proj = Linear(32, [24, 8], bias=True)
    model.head = LMHead(50, 32, tied_to=model.embed if tied else None)
    for param in model.parameters():
        param.data.normal_()
    return model


def run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.proj(x), model.head(x)


@pytest.mark.parametrize("tied", [True, False])
def test_layers_packed_from_the_first_row_drop_their_dense_weight(monkeypatch, tied: bool) -> None:
    model = small_model(tied)
    x = torch.randn(3, 32)
    expected = run(model, x)
    monkeypatch.setattr(cpu_gemm, "time_both", faster(1))
    assert cpu_gemm.prepack_dense_linears(model) == 2
    assert model.proj.weight.numel() == 0
    assert model.head.weight.numel() == (50 * 32 if tied else 0)
    assert model.embed.weight.numel() == 50 * 32
    for got, want in zip(run(model, x), expected):
        torch.testing.assert_close(got, want)


def test_a_threshold_keeps_the_dense_weight_for_fewer_rows(monkeypatch) -> None:
    model = small_model(tied=False)
    monkeypatch.setattr(cpu_gemm, "time_both", faster(4))
    assert cpu_gemm.prepack_dense_linears(model) == 2
    calls = []
    real = cpu_gemm.packed_linear
    monkeypatch.setattr(cpu_gemm, "packed_linear", lambda *args: calls.append(args[0].shape[0]) or real(*args))
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(model.proj(x), F.linear(x, model.proj.weight, model.proj.bias))
    assert calls == [4, 9]


def test_layers_oneDNN_never_wins_on_stay_dense(monkeypatch) -> None:
    model = small_model(tied=True)
    monkeypatch.setattr(cpu_gemm, "time_both", faster(None))
    assert cpu_gemm.prepack_dense_linears(model) == 0
    assert model.proj.onednn_weight is None and model.proj.weight.numel() == 24 * 32 + 8 * 32


def test_an_engine_with_every_layer_packed_gives_transformers_greedy_tokens(tiny_model, monkeypatch) -> None:
    model_dir = tiny_model("LlamaForCausalLM", tie_word_embeddings=True)
    monkeypatch.setattr(cpu_gemm, "time_both", faster(1))
    llm = LLM(str(model_dir), dtype="float32")
    runner = llm.engine.runner
    packed = [m for m in runner.model.modules() if getattr(m, "onednn_weight", None) is not None]
    assert len(packed) == 1 + 4 * llm.engine.config.model.hf_config.num_hidden_layers  # head; qkv, o, gate_up, down
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1)
    for prompt, output in zip(CODE_PROMPTS, llm.generate(CODE_PROMPTS, params, use_tqdm=False)):
        ids = torch.tensor([tokenizer.encode(prompt)])
        out = hf.generate(ids, max_new_tokens=16, do_sample=False, repetition_penalty=1.0, top_p=1.0, temperature=1.0,
                          attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True)
        assert output.outputs[0].token_ids == out.sequences[0, ids.shape[1]:].tolist()
        for token, logits, entry in zip(output.outputs[0].token_ids, out.logits, output.outputs[0].logprobs):
            assert entry[token].logprob == pytest.approx(float(logits[0].log_softmax(-1)[token]), abs=1e-4)


def test_engines_that_pack_dense_weights(tiny_model) -> None:
    from pagedserve.core.config import engine_config_from_args

    device = torch.device("cpu")
    assert cpu_gemm.packs_dense_weights(engine_config_from_args(str(tiny_model())), device)
    assert cpu_gemm.packs_dense_weights(engine_config_from_args(str(tiny_model()), compilation_config=3), device)
    freezing = {"level": 3, "inductor_compile_config": {"freezing": True}}
    assert not cpu_gemm.packs_dense_weights(engine_config_from_args(str(tiny_model()), compilation_config=freezing), device)
    assert not cpu_gemm.packs_dense_weights(engine_config_from_args(str(tiny_model()), torch_compile=True), device)
    assert not cpu_gemm.packs_dense_weights(engine_config_from_args(str(tiny_model())), torch.device("cuda"))


@pytest.mark.parametrize("rows, expected", [(1, 1), (64, 64), (65, 72), (723, 768), (768, 768), (2032, 2048)])
def test_rows_above_exact_rows_run_at_one_of_8_sizes_an_octave(rows: int, expected: int) -> None:
    assert cpu_gemm.bucketed_rows(rows) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(65, 80), (3, 241, 80)])
def test_padded_rows_give_f_linear_on_the_real_rows(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(len(shape))
    weight = torch.randn(96, 80, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    x = torch.randn(*shape, generator=generator).to(dtype)
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 2e-2}
    got = cpu_gemm.packed_linear(x, cpu_gemm.pack(weight), bias)
    assert got.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, F.linear(x, weight, bias), **tolerance)


def test_time_both_takes_turns_over_copies_larger_than_the_l2_cache(monkeypatch) -> None:
    """Each timed call reads the next copy of the weight, as a layer's call in a model's step
    finds its weight evicted by the others'; the copies are the weight's."""
    weight = torch.randn(256, 256)
    read: dict[str, list[torch.Tensor]] = {"dense": [], "packed": []}
    linear = F.linear

    def f_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        read["dense"].append(w)
        return linear(x, w)

    def packed_linear(x: torch.Tensor, p: torch.Tensor, bias: None) -> torch.Tensor:
        read["packed"].append(p)
        return torch.ops.mkldnn._linear_pointwise(x, p, bias, "none", [], "")

    monkeypatch.setattr(cpu_gemm.F, "linear", f_linear)
    monkeypatch.setattr(cpu_gemm, "packed_linear", packed_linear)
    monkeypatch.setattr(cpu_gemm, "_best_time", lambda fn: [fn() for _ in range(200)] and 1.0)
    cpu_gemm.time_both(*cpu_gemm.rotation(weight, cpu_gemm.pack(weight)), 3)
    copies = cpu_gemm.ROTATION_BYTES // (weight.numel() * 4)
    assert copies == 64
    for kind, tensors in read.items():
        assert len({id(t) for t in tensors}) == copies, kind
        assert [id(t) for t in tensors[:copies]] == [id(t) for t in tensors[copies:2 * copies]]
    x = torch.randn(3, 256)
    for w, p in zip(read["dense"][:copies], read["packed"][:copies]):
        torch.testing.assert_close(w, weight, rtol=0, atol=0)
        torch.testing.assert_close(packed_linear(x, p, None), F.linear(x, weight))
