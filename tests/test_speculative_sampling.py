"""The sampled path of speculative verification keeps the target's distribution.

Statistical tests at fixed seeds, significance 0.001: chi-square tests of the first emitted
token's counts against the target's distribution (the rejection rule alone, 6000 draws on a
vocabulary of 6), which fail when the residual step is broken (sampling from p instead of the
residual after a rejection: checked by breaking it while writing them); and of the engine's
tokens 2-4 with and without speculation (a model with a vocabulary of 16, every sampling
transform on), which shows they agree but, at the 300 requests CI affords, has not the power
to catch a broken residual on its own."""

from __future__ import annotations

import shutil

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from pagedserve import LLM, SamplingParams
from pagedserve.core.rejection_sampler import sample_chain

from tiny_models import make_tiny_model

ALPHA = 1e-3


def first_token_counts(p: torch.Tensor, q: torch.Tensor | None, trials: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[1])
    for _ in range(trials):
        if q is None:
            drafts = [2, 0]  # a fixed guess, as an n-gram match is
        else:
            drafts = [int(torch.multinomial(q[j], 1, generator=generator)) for j in range(len(q))]
        counts[sample_chain(p, drafts, q, generator)[0]] += 1
    return counts


@pytest.mark.parametrize("with_q", [False, True], ids=["point-mass", "draft-distribution"])
def test_first_token_follows_the_target(with_q: bool) -> None:
    torch.manual_seed(0)
    vocab, k = 6, 2
    p = torch.softmax(torch.randn(k + 1, vocab) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, vocab) * 1.5, dim=-1) if with_q else None
    trials = 3000
    counts = first_token_counts(p, q, trials, seed=1)
    assert chisquare(counts.numpy(), (p[0] * trials).numpy()).pvalue > ALPHA


def test_a_draft_equal_to_the_target_is_always_accepted() -> None:
    p = torch.softmax(torch.randn(3, 8), dim=-1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        drafts = [int(torch.multinomial(p[j], 1, generator=generator)) for j in range(2)]
        assert sample_chain(p, drafts, p[:2], generator)[:2] == drafts


VOCAB = 16
PROMPT = list(range(3, VOCAB)) * 2  # every token recurs, so the n-gram always proposes


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, tokenizer_dir) -> str:
    folder = tmp_path_factory.mktemp("vocab16")
    make_tiny_model(folder, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.3, num_hidden_layers=1)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return str(folder)


def token_counts(llm: LLM, params: SamplingParams, trials: int) -> torch.Tensor:
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * trials, params, use_tqdm=False)
    counts = torch.zeros(3, VOCAB)
    for out in outputs:
        for position, token in enumerate(out.outputs[0].token_ids[1:4]):
            counts[position, token] += 1
    return counts


@pytest.mark.slow
def test_engine_distribution_with_and_without_speculation(small_vocab_model: str) -> None:
    """Tokens 2-4 (the first ones speculation decides) under temperature, top-k, top-p, min-p
    and a repetition penalty: their counts agree with plain decoding's."""
    params = SamplingParams(
        temperature=0.9, top_k=10, top_p=0.95, min_p=0.01, repetition_penalty=1.3, max_tokens=4, ignore_eos=True
    )
    common = {"dtype": "float32", "max_num_seqs": 128, "max_num_batched_tokens": 1024, "seed": 0}
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "prompt_lookup_max": 2, "disable_by_batch_size": 0}
    trials = 300
    plain = token_counts(LLM(small_vocab_model, **common), params, trials)
    speculative_llm = LLM(small_vocab_model, speculative_config=spec, **{**common, "seed": 1})
    speculative = token_counts(speculative_llm, params, trials)
    assert speculative_llm.engine.scheduler.spec_stats is not None
    for position in range(3):
        table = torch.stack([plain[position], speculative[position]])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table.numpy()).pvalue > ALPHA, f"token {position + 2}"


@pytest.mark.slow
def test_seeded_requests_reproducible_with_speculation(small_vocab_model: str) -> None:
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "disable_by_batch_size": 0}
    llm = LLM(small_vocab_model, dtype="float32", speculative_config=spec)
    prompt = {"prompt_token_ids": PROMPT}

    def run(seeds: list[int]) -> list[list[int]]:
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True) for s in seeds]
        return [o.outputs[0].token_ids for o in llm.generate([prompt] * len(seeds), params, use_tqdm=False)]

    batch = run([7, 8, 7])
    assert batch[0] == batch[2] == run([7])[0]
    assert batch[1] != batch[0]
    outputs = llm.generate([prompt], SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert outputs[0].metrics["spec_num_drafts"] > 0
