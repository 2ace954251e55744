"""Each new family through the engine against transformers: greedy tokens identical and logprobs
within 1e-4 (fp32), with a token budget that chunks the prompts, a KV pool small enough to force
preemption, and a later request that reuses a cached prefix.

transformers runs once per finished sequence (teacher-forced): every generated token must be the
argmax of its logits at that position, which is what its greedy ``generate`` would pick, and the
logprobs come from the same forward. One forward instead of one per token keeps this cheap."""

from __future__ import annotations

import pytest
import torch
from test_engine_vs_hf import PROMPTS
from test_families_vs_hf import GEMMA2, QWEN3_MOE
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.core.layers import cpu_gemm
from pagedserve.plugins.moe import FusedMoE, cpu_experts

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
FAMILIES = {
    "qwen2-windowed": (
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    ),
    "qwen3-tied": ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "phi3": ("Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2ForCausalLM", {**GEMMA2, "sliding_window": 8}),
    "mixtral-top2": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3moe-top1": ("Qwen3MoeForCausalLM", {**QWEN3_MOE, "num_experts_per_tok": 1}),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_greedy_and_logprobs_match_transformers_under_pressure(tiny_model, name: str) -> None:
    architecture, overrides = FAMILIES[name]
    model_dir = tiny_model(architecture, **overrides)
    shared = PROMPTS[1][:80]
    # Three at once (chunked, preempted), then two sharing a prefix: the second is served from it.
    prompts = [PROMPTS[1], PROMPTS[3][:60], PROMPTS[0], shared + " a", shared + " b"]
    llm = LLM(
        str(model_dir),
        dtype="float32",
        max_num_batched_tokens=16,  # the first two prompts are prefilled in chunks
        max_num_seqs=4,
        block_size=4,
        num_kv_blocks=20,  # the longest request alone needs 16 blocks, the first three 36
        enable_prefix_caching=True,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    outputs = llm.generate(prompts[:3], params, use_tqdm=False)
    outputs += llm.generate(prompts[3:4], params, use_tqdm=False)
    outputs += llm.generate(prompts[4:], params, use_tqdm=False)

    assert llm.engine.scheduler.num_preemptions_total > 0
    assert outputs[-1].num_cached_tokens >= 16
    assert llm.engine.kv_cache.num_used_blocks == 0

    assert_transformers_greedy(model_dir, outputs)


def assert_transformers_greedy(model_dir, outputs, lengths: list[int] | None = None) -> None:
    """Every output's tokens (``lengths``, by default ``MAX_TOKENS`` each) transformers' argmax at
    their positions, logprobs within 1e-4."""
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for out, length in zip(outputs, lengths or [MAX_TOKENS] * len(outputs), strict=True):
        completion = out.outputs[0]
        assert len(completion.token_ids) == length
        ids = out.prompt_token_ids + completion.token_ids
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].float()
        n_prompt = len(out.prompt_token_ids)
        rows = logits[n_prompt - 1 : -1]
        assert completion.token_ids == rows.argmax(-1).tolist()
        reference = torch.log_softmax(rows, dim=-1)
        for i, token in enumerate(completion.token_ids):
            assert completion.logprobs[i][token].logprob == pytest.approx(reference[i, token].item(), abs=1e-4)


def packed_mixtral(tiny_model, monkeypatch, dense_up_to: int):
    """The top-2 Mixtral's folder, with every weight an engine loads packed for oneDNN and its
    dense experts taken for steps of up to ``dense_up_to`` tokens (injected timings)."""
    monkeypatch.setattr(cpu_gemm, "time_both", lambda weight, packed, rows: (1.0, 0.5))
    real = cpu_experts.dense_experts_for
    monkeypatch.setattr(cpu_experts, "dense_experts_for", lambda *args: real(
        *args, timer=lambda tokens, routed, dense: (1.0, 0.5 if tokens <= dense_up_to else 2.0)))
    architecture, overrides = FAMILIES["mixtral-top2"]
    return tiny_model(architecture, **overrides)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("compiled", [False, True])
def test_mixtral_with_dense_cpu_experts_matches_transformers(tiny_model, monkeypatch, compiled: bool) -> None:
    """Every weight packed for oneDNN and the experts' dense path (``cpu_experts.DenseExperts``)
    taken for steps of 2-4 tokens (injected timings), eagerly and in the ``-O3`` graph of 4
    sequences: transformers' greedy tokens and logprobs in float32."""
    model_dir = packed_mixtral(tiny_model, monkeypatch, dense_up_to=4)
    compile_args = {"compilation_config": 3, "cuda_graph_sizes": [4]} if compiled else {}
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=4, block_size=4, **compile_args)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, FusedMoE)]
    assert layers and all(layer.cpu_dense is not None and layer.cpu_dense.tokens == (2, 4) for layer in layers)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    outputs = llm.generate([PROMPTS[1], PROMPTS[3][:60], PROMPTS[0]], params, use_tqdm=False)
    assert_transformers_greedy(model_dir, outputs)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
def test_mixtral_compiled_at_exact_batch_sizes_matches_transformers(tiny_model, monkeypatch) -> None:
    """``-O3`` without ``cuda_graph_sizes``: every decode step runs compiled at its own batch size
    (``PaddedDecode.exact``, no padding rows) as requests of different lengths finish (4, 3, 2,
    then 1 sequences), the dense experts taken for 2 tokens (injected timings) and the routed
    ones at 1 and 3-4, a branch on the batch size that splits the symbolic range; every graph compiled
    at start-up, and transformers' greedy tokens and logprobs in float32."""
    from torch._dynamo.utils import counters

    model_dir = packed_mixtral(tiny_model, monkeypatch, dense_up_to=2)
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=4, block_size=4, compilation_config=3)
    padded = llm.engine.runner.padded_decode
    assert padded.exact and padded.sizes == [1, 2, 4]
    sizes: list[tuple[int, int]] = []
    run = padded.run
    padded.run = lambda token_ids, positions, block_ids, size: (sizes.append((len(token_ids), size)),
                                                                run(token_ids, positions, block_ids, size))[1]
    graphs = counters["stats"]["unique_graphs"]
    prompts = [PROMPTS[1], PROMPTS[3][:60], PROMPTS[0], PROMPTS[2]]
    lengths = [MAX_TOKENS, 9, 6, 3]
    outputs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, logprobs=0, ignore_eos=True)
                                     for n in lengths], use_tqdm=False)
    assert counters["stats"]["unique_graphs"] == graphs
    assert {n for n, _ in sizes} == {1, 2, 3, 4} and all(n == size for n, size in sizes)
    assert_transformers_greedy(model_dir, outputs, lengths)
