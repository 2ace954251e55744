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
MAX_TOKENS = 16
MODELS = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 8}),
}


def greedy(llm: LLM, prompts: list[str], **params: object) -> list[list[int]]:
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **params)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sampling, use_tqdm=False)]


METHODS = ["ngram", "suffix", "draft_model"]


@pytest.fixture(scope="module")
def draft_dir(tiny_model) -> str:
    """The draft of both targets: the random Llama, the Llama target itself (every proposal
    right but for rounding) and the Mistral target's twin but for its sliding window (right
    while the context fits in the window, wrong more and more after)."""
    return str(tiny_model("LlamaForCausalLM"))


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tiny_model, draft_dir):
    architecture, overrides = MODELS[request.param]
    model_dir = str(tiny_model(architecture, **overrides))
    plain = LLM(model_dir, dtype="float32")
    return model_dir, {"batch32": greedy(plain, PROMPTS32)}, draft_dir


def spec_config(method: str, draft: str, **extra: object) -> dict:
    config: dict = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": 0, **extra}
    if method == "ngram":
        config["prompt_lookup_max"] = 3
    if method == "draft_model":
        # Always k proposals (the random tiny drafts are never confident): the chains are tested.
        # Eager: the compiled draft has tests of its own (compiling costs seconds an engine).
        config = {"model": draft, "draft_confidence_threshold": 0.0, "enforce_eager": True, **config}
    return config


def test_draft_stops_at_an_unconfident_proposal(model) -> None:
    """With the confidence threshold at 1 every draft stops after its first proposal (the tiny
    draft is never sure), with 0 it proposes k; the output is plain decoding's either way."""
    model_dir, expected, draft = model
    counts = {}
    for threshold in (0.0, 1.0):
        config = spec_config("draft_model", draft, draft_confidence_threshold=threshold)
        llm = LLM(model_dir, dtype="float32", speculative_config=config)
        outputs = llm.generate(PROMPTS32[:4], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected["batch32"][:4]
        counts[threshold] = [sum(o.metrics.get(key, 0) for o in outputs)
                             for key in ("spec_num_drafts", "spec_num_draft_tokens")]
    assert counts[1.0][1] == counts[1.0][0] > 0
    assert counts[0.0][1] > counts[0.0][0]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_identical_batch_1_and_32_and_prefix_cached(model, method: str) -> None:
    model_dir, expected, draft = model
    llm = LLM(model_dir, dtype="float32", speculative_config=spec_config(method, draft))
    one_by_one = [greedy(llm, [p])[0] for p in PROMPTS32[:3]]
    assert one_by_one == expected["batch32"][:3]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.generate(PROMPTS32, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected["batch32"]
    assert sum(o.metrics.get("spec_num_accepted_tokens", 0) for o in outputs) > 0
    again = llm.generate(PROMPTS32[:8], params, use_tqdm=False)  # prefix-cache hits now
    assert [o.outputs[0].token_ids for o in again] == expected["batch32"][:8]
    assert sum(o.num_cached_tokens for o in again) > 0
    assert sum(o.metrics.get("spec_num_drafts", 0) for o in again) > 0
    assert llm.engine.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize("method", METHODS)
def test_greedy_identical_chunked_prefill_and_preemption(model, method: str) -> None:
    model_dir, expected, draft = model
    config = spec_config(method, draft)
    prompts, want = PROMPTS32[:6], expected["batch32"][:6]
    chunked = LLM(model_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=8, speculative_config=config)
    assert greedy(chunked, prompts) == want
    small = LLM(
        model_dir, dtype="float32", block_size=4, num_kv_blocks=20, enable_prefix_caching=False,
        speculative_config=config,
    )
    assert greedy(small, prompts) == want
    assert small.engine.scheduler.num_preemptions_total > 0
    assert small.engine.kv_cache.num_used_blocks == 0


def test_stop_strings_logprobs_and_n_with_speculation(model) -> None:
    """A stop string inside a step's accepted tokens ends the output there; logprobs are the
    target's; n > 1 forks keep speculating."""
    model_dir, expected, draft = model
    plain = LLM(model_dir, dtype="float32")
    spec = LLM(model_dir, dtype="float32", speculative_config=spec_config("ngram", draft))
    tokenizer = plain.get_tokenizer()
    prompts = BASE[:3]
    texts = [tokenizer.decode(ids) for ids in expected["batch32"][: len(prompts)]]
    stops = [t[len(t) // 2 : len(t) // 2 + 3] or "\n" for t in texts]
    for prompt, stop in zip(prompts, stops):
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=[stop], logprobs=2)
        want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        got = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason
        )
        assert len(got.logprobs) == len(got.token_ids)
        for mine, theirs in zip(got.logprobs, want.logprobs):
            assert mine.keys() == theirs.keys()
            for token in mine:
                assert mine[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-4)
    n_params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, n=3)
    forked = spec.generate(BASE[:2], n_params, use_tqdm=False)
    for out, want in zip(forked, expected["batch32"][:2]):
        assert [c.token_ids for c in out.outputs] == [want] * 3
    assert spec.engine.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_abort_mid_speculation_leaks_no_block(model, method: str) -> None:
    model_dir, expected, draft = model
    llm = LLM(model_dir, dtype="float32", speculative_config=spec_config(method, draft))
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    for i, prompt in enumerate(PROMPTS32[:8]):
        engine.add_request(str(i), prompt, params)
    aborted = set()
    while engine.has_unfinished_requests():
        engine.step()
        speculating = [r for r in engine.scheduler.running if r.spec_token_ids]
        if speculating and len(aborted) < 4:
            aborted.add(speculating[0].parent_id)
            engine.abort_request(speculating[0].parent_id)
    assert len(aborted) == 4
    assert engine.kv_cache.num_used_blocks == 0
    assert not engine.runner.proposer._states if method == "draft_model" else True


def test_start_up_errors(tmp_path, tokenizer_dir, model) -> None:
    """An unknown method, a draft_model without a model, a draft with another vocabulary."""
    import shutil

    from tiny_models import make_tiny_model

    model_dir, _, _ = model
    small_vocab = make_tiny_model(tmp_path / "v256", vocab_size=256)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, small_vocab / item.name)
    with pytest.raises(ValueError, match="vocabulary of 256 tokens but the target .* has 512"):
        LLM(model_dir, speculative_config={"method": "draft_model", "model": str(small_vocab), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="not registered; known: draft_model, ngram, suffix"):
        LLM(model_dir, speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="needs a 'model'"):
        LLM(model_dir, speculative_config={"method": "draft_model", "num_speculative_tokens": 2})


def test_step_counts_add_up_to_request_metrics(model) -> None:
    model_dir, _, draft = model
    llm = LLM(model_dir, dtype="float32", speculative_config=spec_config("ngram", draft))
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    for i, prompt in enumerate(BASE):
        engine.add_request(str(i), prompt, params)
    totals = [0, 0, 0]
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        stats = engine.scheduler.spec_stats
        totals = [totals[0] + stats.num_drafts, totals[1] + stats.num_draft_tokens, totals[2] + stats.num_accepted_tokens]
        assert sum(stats.num_accepted_tokens_per_pos) == stats.num_accepted_tokens
    names = ["spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens"]
    assert totals == [sum(o.metrics.get(n, 0) for o in finished.values()) for n in names]
    assert totals[0] > 0


def test_draft_runs_in_float32_on_the_cpu_under_a_bfloat16_target(model) -> None:
    """On the CPU the draft's weights and KV are float32 whatever the target's dtype (its
    few-row matmuls are cheaper so). Not compared token for token with plain decoding: in
    bfloat16 a 1 + k token verification rounds differently from k + 1 one-token steps."""
    import torch

    model_dir, _, draft = model
    spec = LLM(model_dir, dtype="bfloat16", speculative_config=spec_config("draft_model", draft))
    proposer = spec.engine.runner.proposer
    assert next(proposer.model.parameters()).dtype == torch.float32
    assert all(layer.kv_cache.dtype == torch.float32 for layer in proposer.layers)
    assert next(spec.engine.runner.model.parameters()).dtype == torch.bfloat16
    outputs = spec.generate(BASE, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                            use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [MAX_TOKENS] * len(BASE)
    assert sum(o.metrics.get("spec_num_draft_tokens", 0) for o in outputs) > 0


def test_a_draft_that_is_the_target_has_its_proposals_accepted(tiny_model, draft_dir) -> None:
    """The Llama target as its own draft (float32 both): every proposal is the target's token,
    so nearly all are accepted, at batch 1 and 32 alike. This holds only while the draft has
    KV at every position: its catch-up must compute every token it has not read (skipping the
    target's own tokens, for one, rejects a third of the proposals)."""
    llm = LLM(draft_dir, dtype="float32", speculative_config=spec_config("draft_model", draft_dir))
    for prompts in (BASE[:1], PROMPTS32):
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                               use_tqdm=False)
        proposed = sum(o.metrics.get("spec_num_draft_tokens", 0) for o in outputs)
        accepted = sum(o.metrics.get("spec_num_accepted_tokens", 0) for o in outputs)
        assert proposed > 0 and accepted >= 0.9 * proposed


def test_draft_reuses_the_kv_of_its_accepted_proposals(model) -> None:
    """The draft's KV of the proposals it fed is kept where the target accepted them: its
    proposals are those of a draft that catches up on every token from scratch each step, and
    its catch-ups feed far fewer tokens (the target's own one, as a decode step, after a
    rejection; the last proposal and the target's token after a full acceptance)."""
    model_dir, expected, draft = model
    proposals: dict[bool, list[list[list[int]]]] = {}
    fed: dict[bool, int] = {}
    for reuse in (True, False):
        llm = LLM(model_dir, dtype="float32", speculative_config=spec_config("draft_model", draft))
        proposer = llm.engine.runner.proposer
        propose, forward = proposer.propose, proposer._forward
        calls = proposals[reuse] = []
        fed[reuse] = 0

        def spy_propose(batch, propose=propose, calls=calls, reuse=reuse, proposer=proposer):
            if not reuse:
                proposer._states.clear()  # the whole history recomputed
            drafts = propose(batch)
            calls.append([d.token_ids for d in drafts])
            return drafts

        def spy_forward(seqs, token_ids, forward=forward, reuse=reuse):
            fed[reuse] += len(token_ids)
            return forward(seqs, token_ids)

        proposer.propose, proposer._forward = spy_propose, spy_forward
        outputs = llm.generate(PROMPTS32[:4], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected["batch32"][:4]
    assert proposals[True] == proposals[False] and proposals[True]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    assert prompt_tokens < fed[True] < prompt_tokens + 2 * len(proposals[True]) * len(outputs) < fed[False]


def test_the_compiled_draft_gives_plain_decodings_tokens(model) -> None:
    """By default the draft's decode steps are compiled on the CPU (one graph per padded size it
    drafts at: 1 and 2 here), and the output is still plain decoding's, alone and in pairs."""
    model_dir, expected, draft = model
    config = spec_config("draft_model", draft, enforce_eager=None, disable_by_batch_size=2)
    llm = LLM(model_dir, dtype="float32", speculative_config=config)
    decode = llm.engine.runner.proposer._decode
    assert decode.sizes == [1, 2] and hasattr(decode.forward, "_orig_mod")
    for prompts, want in ((PROMPTS32[:1], expected["batch32"][:1]), (PROMPTS32[1:3], expected["batch32"][1:3])):
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == want
        assert sum(o.metrics.get("spec_num_draft_tokens", 0) for o in outputs) > 0


def test_a_draft_that_does_not_compile_runs_eagerly_unless_compiling_was_asked_for(
    tiny_model, draft_dir, monkeypatch, caplog
) -> None:
    import pagedserve.plugins.speculative.draft_model as draft_model

    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(draft_model, "compiled_decode_steps", fail)
    model_dir = str(tiny_model("LlamaForCausalLM"))
    config = {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": 2}
    with caplog.at_level("WARNING"):
        llm = LLM(model_dir, dtype="float32", speculative_config=config)
    assert "the draft runs eagerly" in caplog.text
    assert not hasattr(llm.engine.runner.proposer._decode.forward, "_orig_mod")
    with pytest.raises(ValueError, match="set speculative_config enforce_eager to true"):
        LLM(model_dir, dtype="float32", speculative_config={**config, "enforce_eager": False})


def test_a_compiled_draft_that_is_the_target_has_its_proposals_accepted(draft_dir) -> None:
    """The compiled draft's KV writes and paged reads are right: as its own draft the Llama
    target has nearly every proposal accepted (a draft reading stale KV is rejected often)."""
    config = spec_config("draft_model", draft_dir, enforce_eager=None, disable_by_batch_size=1)
    llm = LLM(draft_dir, dtype="float32", speculative_config=config)
    assert hasattr(llm.engine.runner.proposer._decode.forward, "_orig_mod")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = [llm.generate(prompt, params, use_tqdm=False)[0] for prompt in BASE[:2]]  # one at a time
    proposed = sum(o.metrics.get("spec_num_draft_tokens", 0) for o in outputs)
    accepted = sum(o.metrics.get("spec_num_accepted_tokens", 0) for o in outputs)
    assert proposed > 0 and accepted >= 0.9 * proposed
