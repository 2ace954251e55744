"""Multi-LoRA serving against transformers + PEFT (the oracle), with adapters PEFT itself made on
tiny random Llama and Mistral models (A and B random, so every adapter changes the output):
greedy tokens identical and logprobs within 1e-4 in fp32, a batch mixing 8 adapters and the base
model equal to each request alone, and chunked prefill, preemption and prefix caching exact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pagedserve import LLM, LoRARequest, SamplingParams

from lora_helpers import PeftOracle, make_peft_adapter

pytestmark = pytest.mark.slow

MAX_TOKENS = 10
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):",
    "x = 1",
]
#: Eight adapters of different shapes: ranks, targets, rsLoRA, per-module rank and alpha.
ADAPTER_CONFIGS = [
    {"r": 4},
    {"r": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    {"r": 2, "target_modules": ["o_proj", "down_proj"], "lora_alpha": 16},
    {"r": 4, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    {"r": 8, "target_modules": ["gate_proj", "up_proj", "k_proj"]},
    {"r": 1},
    {"r": 6, "lora_alpha": 3},
    {"r": 8, "target_modules": "all-linear", "use_rslora": True},
]


class Setup:
    def __init__(self, model_dir: Path, adapter_dirs: list[Path]) -> None:
        self.model_dir = model_dir
        self.loras = [LoRARequest(f"adapter-{i}", i + 1, str(d)) for i, d in enumerate(adapter_dirs)]
        self.oracle = PeftOracle(model_dir, {lora.lora_name: Path(lora.lora_path) for lora in self.loras})
        self._expected: dict[tuple[str | None, str], tuple[list[int], list[float]]] = {}

    def expected(self, lora: LoRARequest | None, prompt: str) -> tuple[list[int], list[float]]:
        key = (None if lora is None else lora.lora_name, prompt)
        if key not in self._expected:
            ids = self.oracle.tokenizer.encode(prompt)
            self._expected[key] = self.oracle.greedy(key[0], ids, MAX_TOKENS)
        return self._expected[key]


def build(tiny_model, tmp_path_factory, architecture: str, num_adapters: int, **overrides) -> Setup:
    model_dir = tiny_model(architecture, **overrides)
    root = tmp_path_factory.mktemp(f"adapters-{architecture.lower()}")
    dirs = [
        make_peft_adapter(model_dir, root / f"a{i}", seed=100 + i, **config)
        for i, config in enumerate(ADAPTER_CONFIGS[:num_adapters])
    ]
    return Setup(model_dir, dirs)


@pytest.fixture(scope="module")
def llama(tiny_model, tmp_path_factory) -> Setup:
    return build(tiny_model, tmp_path_factory, "LlamaForCausalLM", 8)


@pytest.fixture(scope="module")
def mistral(tiny_model, tmp_path_factory) -> Setup:
    return build(tiny_model, tmp_path_factory, "MistralForCausalLM", 3, sliding_window=8)


def generate(llm: LLM, prompts: list[str], loras: list[LoRARequest | None]) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    results = []
    for out in llm.generate(prompts, params, lora_request=loras, use_tqdm=False):
        completion = out.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        results.append((completion.token_ids, logprobs))
    return results


def assert_matches(setup: Setup, prompts, loras, results) -> None:
    for prompt, lora, (tokens, logprobs) in zip(prompts, loras, results):
        expected_tokens, expected_logprobs = setup.expected(lora, prompt)
        name = None if lora is None else lora.lora_name
        assert tokens == expected_tokens, (name, prompt)
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-4), (name, prompt)


def test_adapters_change_the_output(llama: Setup) -> None:
    """Guards the other tests: each adapter's greedy tokens differ from the base model's."""
    base = llama.expected(None, PROMPTS[0])[0]
    assert all(llama.expected(lora, PROMPTS[0])[0] != base for lora in llama.loras)


def test_mixed_batch_of_8_adapters_and_the_base_matches_peft_and_each_alone(llama: Setup) -> None:
    llm = LLM(str(llama.model_dir), dtype="float32", enable_lora=True, max_loras=8, max_lora_rank=8)
    loras = [None, *llama.loras] * 2
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(loras))]
    mixed = generate(llm, prompts, loras)
    assert_matches(llama, prompts, loras, mixed)
    for prompt, lora, result in list(zip(prompts, loras, mixed))[:9]:
        alone = generate(llm, [prompt], [lora])[0]
        assert alone[0] == result[0]
        assert alone[1] == pytest.approx(result[1], abs=1e-5)
    assert llm.engine.kv_cache.num_used_blocks == 0


def test_mistral_sliding_window_with_adapters_matches_peft(mistral: Setup) -> None:
    llm = LLM(str(mistral.model_dir), dtype="float32", enable_lora=True, max_loras=3, max_lora_rank=8)
    loras = [None, *mistral.loras]
    prompts = [PROMPTS[1]] * len(loras)
    assert len(llm.get_tokenizer().encode(PROMPTS[1])) > 8
    assert_matches(mistral, prompts, loras, generate(llm, prompts, loras))


def check_blocks(llm: LLM) -> None:
    """Every block's reference count is the number of live requests holding it."""
    scheduler = llm.engine.scheduler
    holders = Counter(b for r in scheduler.running for b in r.block_ids)
    pool = llm.engine.kv_cache.pool
    assert all(not r.block_ids for r in scheduler.waiting)
    assert [pool.ref_counts[b] for b in range(pool.num_blocks)] == [holders[b] for b in range(pool.num_blocks)]


def test_chunked_prefill_preemption_and_prefix_caching_stay_exact(llama: Setup) -> None:
    """Small token budget (chunks), a small cache (preemption), prompts sharing a prefix across
    adapters and within one, fewer slots than adapters (the scheduler's limit) and fewer CPU
    copies than adapters (reloads): every request still gets PEFT's tokens."""
    llm = LLM(
        str(llama.model_dir), dtype="float32", enable_lora=True, max_loras=3, max_cpu_loras=4,
        max_lora_rank=8, block_size=4, num_kv_blocks=20, max_num_batched_tokens=16, max_num_seqs=8,
    )
    shared = PROMPTS[1]
    loras = [llama.loras[i % 6] if i % 7 else None for i in range(14)]
    prompts = [shared if i % 2 else PROMPTS[0] for i in range(14)]
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(str(i), prompt, params, lora_request=lora)
    results: dict[str, tuple[list[int], list[float]]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                results[out.request_id] = (c.token_ids, [s[t].logprob for s, t in zip(c.logprobs, c.token_ids)])
        check_blocks(llm)
        assert len(engine.scheduler.running_lora_adapters) <= 3
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.kv_cache.prefix_cache_hits > 0
    assert_matches(llama, prompts, loras, [results[str(i)] for i in range(14)])
    assert engine.kv_cache.num_used_blocks == 0


def test_unloading_and_reloading_adapters_leaks_nothing(llama: Setup) -> None:
    llm = LLM(str(llama.model_dir), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    manager = llm.engine.lora_manager
    for round_ in range(2):
        loras = llama.loras[round_ * 2 : round_ * 2 + 2] + [None]
        prompts = [PROMPTS[2]] * 3
        assert_matches(llama, prompts, loras, generate(llm, prompts, loras))
        for lora in loras[:2]:
            assert manager.remove_adapter(lora.lora_int_id)
        assert manager.list_adapters() == []
        assert llm.engine.kv_cache.num_used_blocks == 0
    with pytest.raises(ValueError, match="already adapter"):
        llm.engine.add_request("x", "x", lora_request=LoRARequest("other", 1, llama.loras[0].lora_path))
        llm.engine.add_request("y", "x", lora_request=LoRARequest("again", 1, llama.loras[1].lora_path))
