"""The engine on a CUDA GPU (skipped without one; ``pytest -m cuda`` is the GPU set that
``benchmarks/gpu-check.sh`` runs): transformers' greedy tokens with decode steps replayed as CUDA
graphs and with ``enforce_eager``, the KV cache sized by the measured activation peak, and at
most one synchronising device-to-host copy in a decode step (torch's sync debug mode)."""

from __future__ import annotations

import warnings

import pytest
import torch

from pagedserve import LLM, SamplingParams
from test_engine_vs_hf import CONFIGS, MAX_TOKENS, PROMPTS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def hf_greedy_cuda(model_dir, prompts: list[str], dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda()
    results = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], device="cuda")
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
        results.append(out[0, ids.shape[1] :].tolist())
    return results


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_greedy_tokens_with_cuda_graphs_and_eager(tiny_model, name: str) -> None:
    architecture, overrides = CONFIGS[name]
    model_dir = tiny_model(architecture, **overrides)
    expected = hf_greedy_cuda(model_dir, PROMPTS, torch.float32)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    for eager in (False, True):
        llm = LLM(str(model_dir), dtype="float32", device="cuda", max_num_seqs=8, enforce_eager=eager)
        runner = llm.engine.runner
        assert (runner.cuda_graph_reason is None) == (not eager)
        assert bool(runner.padded_decode and runner.padded_decode.graphs) == (not eager)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert got == expected, f"enforce_eager={eager}"
        del llm
        torch.cuda.empty_cache()


def test_kv_cache_sized_by_the_measured_peak(tiny_model) -> None:
    llm = LLM(str(tiny_model()), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3, max_num_seqs=16)
    runner = llm.engine.runner
    free, total = torch.cuda.mem_get_info()
    kv = sum(t.numel() * t.element_size() for t in runner.kv_caches)
    assert runner.num_kv_blocks > 0 and kv < 0.3 * total


def test_one_synchronising_copy_per_decode_step(tiny_model) -> None:
    llm = LLM(str(tiny_model()), dtype="bfloat16", device="cuda", max_num_seqs=8)
    engine = llm.engine
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, logprobs=2, max_tokens=16, ignore_eos=True)
    for i in range(8):
        engine.add_request(str(i), "def f(x):" * (1 + i % 3), params)
    for _ in range(4):  # past the prefills
        engine.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 2, syncs  # the sampled tokens' copy (and the timing event, done by then)
