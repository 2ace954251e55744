"""The engine against transformers (the oracle): greedy tokens identical, logprobs close, under
concurrent batching, chunked prefill, preemption, prefix caching and parallel sampling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve import LLM, SamplingParams
from pagedserve.assets import BUNDLED_MODELS
from pagedserve.core.loader import resolve_model_path
from prompts import CODE_PROMPTS

pytestmark = pytest.mark.slow

PROMPTS = CODE_PROMPTS
MAX_TOKENS = 24

CONFIGS = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama-mha-tied": ("LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope": (
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 8}),
}


def hf_greedy(model_dir: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """transformers' own generate, one prompt at a time (no padding to get wrong)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        # Plain greedy: a generation_config.json's sampling defaults (the bundled model's repetition
        # penalty) would otherwise apply.
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, repetition_penalty=1.0, top_p=1.0,
                             temperature=1.0, attention_mask=torch.ones_like(ids))
        results.append(out[0, ids.shape[1] :].tolist())
    return results


def greedy(llm: LLM, prompts: list[str], **params: object) -> list[list[int]]:
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **params)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, sampling, use_tqdm=False)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_identical_to_transformers(tiny_model, name: str) -> None:
    architecture, overrides = CONFIGS[name]
    model_dir = tiny_model(architecture, **overrides)
    expected = hf_greedy(model_dir, PROMPTS, MAX_TOKENS)
    llm = LLM(str(model_dir), dtype="float32")
    assert greedy(llm, PROMPTS) == expected
    if name == "mistral-window":
        assert max(len(llm.get_tokenizer().encode(p)) for p in PROMPTS) > 8


@pytest.mark.parametrize("name", list(BUNDLED_MODELS))
def test_greedy_identical_to_transformers_on_bundled_models(name: str) -> None:
    """The same check on the trained models shipped as package data, whose sharp distributions
    (unlike random weights) make long, structured continuations; the last prompt is longer than
    the Mistral variant's sliding window."""
    model_dir = Path(resolve_model_path(name))
    prompts = [*PROMPTS, "\n\n".join(PROMPTS * 3)]
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = LLM(name, dtype="float32")
    assert greedy(llm, prompts) == expected
    window = getattr(llm.engine.config.model.hf_config, "sliding_window", None)
    if window:
        assert len(llm.get_tokenizer().encode(prompts[-1])) > window


def test_chunked_prefill_and_preemption_keep_tokens(tiny_model) -> None:
    model_dir = tiny_model()
    expected = hf_greedy(model_dir, PROMPTS, MAX_TOKENS)
    # A budget of 8 tokens a step splits every long prompt into chunks.
    chunked = LLM(str(model_dir), dtype="float32", max_num_seqs=4, max_num_batched_tokens=8)
    assert greedy(chunked, PROMPTS) == expected
    # 32 blocks of 4 tokens (just enough for the longest request alone) cannot hold all five requests at once: some are preempted and recomputed.
    small = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=32, enable_prefix_caching=False)
    assert greedy(small, PROMPTS) == expected
    assert small.engine.scheduler.num_preemptions_total > 0
    assert small.engine.kv_cache.num_used_blocks == 0


def test_prefix_caching_on_and_off_identical(tiny_model) -> None:
    model_dir = tiny_model()
    shared = PROMPTS[1] * 2
    prompts = [shared + " a", shared + " b", shared + "\n    return None"]
    off = LLM(str(model_dir), dtype="float32", enable_prefix_caching=False)
    on = LLM(str(model_dir), dtype="float32", enable_prefix_caching=True)
    expected = greedy(off, prompts)
    first = on.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    rest = on.generate(prompts[1:], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    assert all(o.num_cached_tokens >= 16 for o in rest)
    assert first[0].num_cached_tokens == 0


def test_logprobs_close_to_transformers(tiny_model) -> None:
    model_dir = tiny_model()
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=16, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, prompt_logprobs=2)
    outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for out in outputs:
        completion = out.outputs[0]
        ids = out.prompt_token_ids + completion.token_ids
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        n_prompt = len(out.prompt_token_ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
        for pos in range(1, n_prompt):
            entry = out.prompt_logprobs[pos][ids[pos]]
            assert entry.logprob == pytest.approx(reference[pos - 1, ids[pos]].item(), abs=1e-4)
            assert len(out.prompt_logprobs[pos]) in (2, 3)
        for i, token in enumerate(completion.token_ids):
            step = completion.logprobs[i]
            row = reference[n_prompt + i - 1]
            assert step[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert step[token].rank == 1  # greedy picks the top token
            top3 = torch.topk(row, 3).indices.tolist()
            assert set(top3) <= set(step)
        assert completion.cumulative_logprob == pytest.approx(
            sum(completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids))
        )
        assert math.isfinite(completion.cumulative_logprob)


def test_seeded_sampling_reproducible_and_independent_of_batch(tiny_model) -> None:
    model_dir = tiny_model()
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    unseeded = SamplingParams(temperature=1.0, max_tokens=16)
    alone = LLM(str(model_dir), dtype="float32").generate([PROMPTS[0]], seeded, use_tqdm=False)
    again = LLM(str(model_dir), dtype="float32").generate([PROMPTS[0]], seeded, use_tqdm=False)
    crowd = LLM(str(model_dir), dtype="float32").generate(
        [PROMPTS[2], PROMPTS[0], PROMPTS[3]], [unseeded, seeded, unseeded], use_tqdm=False
    )
    assert alone[0].outputs[0].token_ids == again[0].outputs[0].token_ids
    assert crowd[1].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_parallel_sampling_shares_the_prompt_copy_on_write(tiny_model) -> None:
    model_dir = tiny_model()
    llm = LLM(str(model_dir), dtype="float32", block_size=4)
    expected = hf_greedy(model_dir, PROMPTS[:2], MAX_TOKENS)
    # Greedy children must all equal the single greedy sequence: any copy-on-write mistake
    # (a child writing into a block its siblings read) would change their tokens.
    outs = llm.generate(PROMPTS[:2], SamplingParams(n=3, temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for out, want in zip(outs, expected):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == want for c in out.outputs)
    sampled = llm.generate([PROMPTS[1]], SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7), use_tqdm=False)
    assert len({tuple(c.token_ids) for c in sampled[0].outputs}) > 1
    assert llm.engine.kv_cache.num_used_blocks == 0


def test_chat_uses_the_template(tiny_model) -> None:
    model_dir = tiny_model()
    llm = LLM(str(model_dir), dtype="float32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out.prompt_token_ids == expected["input_ids"]


def test_prompt_logprobs_of_a_request_that_finishes_in_its_prefill_step(tiny_model) -> None:
    # max_tokens=1: the request finishes in the step that computes its last prompt chunk.
    llm = LLM(str(tiny_model()), dtype="float32", max_num_batched_tokens=16, max_num_seqs=4)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(entry is not None for entry in out.prompt_logprobs[1:])


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_torch_compile_identical_to_transformers_without_recompiling(tiny_model, name: str) -> None:
    """The compiled forward (attention as one opaque custom op) gives transformers' tokens, over
    mixed steps of chunks and decodes, with only the graphs compiled at start-up."""
    from torch._dynamo.utils import counters

    architecture, overrides = CONFIGS[name]
    model_dir = tiny_model(architecture, **overrides)
    expected = hf_greedy(model_dir, PROMPTS, MAX_TOKENS)
    before = counters["stats"]["unique_graphs"]
    llm = LLM(str(model_dir), dtype="float32", torch_compile=True, max_num_batched_tokens=16, max_num_seqs=4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == before + 2  # the one-token graph and the symbolic one, compiled at start-up
    assert greedy(llm, PROMPTS) == expected
    assert counters["stats"]["unique_graphs"] == graphs


def test_start_up_warm_up_leaves_a_zeroed_cache(tiny_model) -> None:
    """The runner's dummy step at the largest batch (as many tokens as the cache holds) writes K/V;
    it zeroes them after, as the attention backend contract says a never-written slot is."""
    llm = LLM(str(tiny_model()), dtype="float32", block_size=4, num_kv_blocks=16, max_model_len=64)
    assert all(not kv.any() for kv in llm.engine.runner.kv_caches)
    assert llm.engine.kv_cache.num_used_blocks == 0
    assert greedy(llm, PROMPTS[:1]) == hf_greedy(tiny_model(), PROMPTS[:1], MAX_TOKENS)
