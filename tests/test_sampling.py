import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pagedserve.plugins.samplers as sampler_plugin
from pagedserve.core import sampling
from pagedserve.core.plugins import PluginManager
from pagedserve.core.request import Request
from pagedserve.core.sampling import (
    Logprob,
    SamplingBatch,
    build_sampler,
    check_token_ids,
    compute_prompt_logprobs,
)
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.plugins.samplers.default import DefaultSampler
from pagedserve.plugins.samplers.processors import (
    AllowedTokenIdsProcessor,
    BadWordsProcessor,
    LogitBiasProcessor,
    MinTokensProcessor,
    PenaltiesProcessor,
    PerRequestProcessor,
)

VOCAB = 8


def make_request(
    params: SamplingParams, prompt: list[int] = (1, 2), output: list[int] = (), index: int = 0
) -> Request:
    request = Request(f"r{id(params)}", list(prompt), params, index=index)
    for token in output:
        request.append_output_token(token)
    return request


def batch_of(*requests: Request) -> SamplingBatch:
    return SamplingBatch(list(requests))


def manager() -> PluginManager:
    pm = PluginManager(allow=[])
    pm.register_plugin(sampler_plugin, "default_sampler")
    return pm


def sampler(vocab: int = VOCAB, seed: int = 0) -> DefaultSampler:
    return build_sampler("default", vocab, "cpu", seed, manager=manager())


# -- processors, against hand computations ----------------------------------------------------


def test_logit_bias_adds_to_listed_tokens_of_its_row_only() -> None:
    logits = torch.zeros(2, VOCAB)
    batch = batch_of(
        make_request(SamplingParams(logit_bias={1: 2.0, 3: -1.5})), make_request(SamplingParams())
    )
    out = LogitBiasProcessor(VOCAB, "cpu").apply(logits, batch)
    expected = torch.zeros(2, VOCAB)
    expected[0, 1], expected[0, 3] = 2.0, -1.5
    assert torch.equal(out, expected)


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    def params(**kw) -> SamplingParams:
        p = SamplingParams(stop_token_ids=[6], **kw)
        p.eos_token_ids = (5,)
        return p

    batch = batch_of(
        make_request(params(min_tokens=2), output=[3]),
        make_request(params(min_tokens=2, ignore_eos=True)),
        make_request(params(min_tokens=2), output=[3, 4]),
        make_request(params()),
    )
    out = MinTokensProcessor(VOCAB, "cpu").apply(torch.ones(4, VOCAB), batch)
    inf = float("-inf")
    assert out[0].tolist() == [1, 1, 1, 1, 1, inf, inf, 1]
    assert out[1].tolist() == [1, 1, 1, 1, 1, 1, inf, 1]
    assert torch.equal(out[2:], torch.ones(2, VOCAB))


def test_penalties_follow_the_vllm_formulas() -> None:
    row = [1.0, 2.0, -1.0, 4.0, 0.5, -3.0, 0.0, 1.5]
    logits = torch.tensor([row, row])
    penalised = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    batch = batch_of(
        make_request(penalised, prompt=[1, 2], output=[2, 3, 3]),
        make_request(SamplingParams(), prompt=[1, 2], output=[2, 3, 3]),
    )
    out = PenaltiesProcessor(VOCAB, "cpu").apply(logits, batch)
    expected = list(row)
    expected[1] = 2.0 / 2.0  # in the prompt only: repetition penalty alone
    expected[2] = -1.0 * 2.0 - 0.5 * 1 - 0.25  # negative logit: multiplied; seen once in output
    expected[3] = 4.0 / 2.0 - 0.5 * 2 - 0.25  # seen twice in output
    assert out[0].tolist() == pytest.approx(expected)
    assert out[1].tolist() == row


def test_allowed_token_ids_mask_every_other_token_of_its_row_only() -> None:
    logits = torch.arange(2 * VOCAB, dtype=torch.float32).reshape(2, VOCAB)
    batch = batch_of(make_request(SamplingParams(allowed_token_ids=[1, 5])), make_request(SamplingParams()))
    out = AllowedTokenIdsProcessor(VOCAB, "cpu").apply(logits.clone(), batch)
    kept = [t for t in range(VOCAB) if out[0, t] != float("-inf")]
    assert kept == [1, 5] and out[0, 5] == logits[0, 5]
    assert torch.equal(out[1], logits[1])


def test_bad_words_ban_the_last_token_once_the_rest_was_generated() -> None:
    def request(output: list[int]) -> Request:
        params = SamplingParams(bad_words=["x"])
        params.bad_words_token_ids = [[3], [4, 5, 6]]
        return make_request(params, output=output)

    logits = torch.zeros(3, VOCAB)
    batch = batch_of(request([]), request([1, 4, 5]), request([4, 1, 5]))
    out = BadWordsProcessor(VOCAB, "cpu").apply(logits, batch)
    banned = [[t for t in range(VOCAB) if out[r, t] == float("-inf")] for r in range(3)]
    assert banned == [[3], [3, 6], [3]]


def test_per_request_processors_take_two_or_three_arguments_and_change_their_row() -> None:
    seen = []

    def two(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        seen.append(("two", list(output_ids)))
        row[0] = 100.0
        return row

    def three(prompt_ids: list[int], output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        seen.append(("three", list(prompt_ids), list(output_ids)))
        return row + 1.0  # a new tensor: copied into the row

    logits = torch.zeros(2, VOCAB)
    batch = batch_of(make_request(SamplingParams()), make_request(SamplingParams(logits_processors=[two, three]), output=[7]))
    out = PerRequestProcessor(VOCAB, "cpu").apply(logits, batch)
    assert seen == [("two", [7]), ("three", [1, 2], [7])]
    assert out[1, 0] == 101.0 and out[1, 1] == 1.0
    assert out[0].abs().sum() == 0


def test_processors_are_registered_in_order_and_built_by_build_sampler() -> None:
    registry = manager().registry("logits_processors")
    orders = {e.name: e.metadata["order"] for e in registry.entries()}
    assert orders["allowed_token_ids"] < orders["bad_words"] < orders["per_request"]
    assert orders["per_request"] < orders["logit_bias"] < orders["min_tokens"] < orders["penalties"]
    built = sampler()
    assert isinstance(built, DefaultSampler)
    assert [type(p) for p in built.processors] == [
        AllowedTokenIdsProcessor,
        BadWordsProcessor,
        PerRequestProcessor,
        LogitBiasProcessor,
        MinTokensProcessor,
        PenaltiesProcessor,
    ]


def test_plugin_module_does_not_import_torch() -> None:
    code = "import sys, pagedserve.plugins.samplers; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_check_token_ids_rejects_ids_outside_the_vocabulary() -> None:
    check_token_ids(SamplingParams(logit_bias={7: 1.0}, stop_token_ids=[7]), VOCAB)
    with pytest.raises(ValueError, match="logit_bias"):
        check_token_ids(SamplingParams(logit_bias={8: 1.0}), VOCAB)
    with pytest.raises(ValueError, match="stop_token_ids"):
        check_token_ids(SamplingParams(stop_token_ids=[VOCAB]), VOCAB)


# -- greedy and random sampling -----------------------------------------------------------------


def test_greedy_is_argmax_of_the_processed_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=gen)
    params = [SamplingParams(temperature=0.0) for _ in range(5)]
    params.append(SamplingParams(temperature=0.0, logit_bias={int(logits[5].argmin()): 100.0}))
    out = sampler()(logits.clone(), batch_of(*(make_request(p) for p in params)))
    expected = logits.argmax(dim=1)
    expected[5] = logits[5].argmin()
    assert out.token_ids == expected.tolist()
    assert out.logprobs == [None] * 6


def test_greedy_rows_stay_argmax_in_a_mixed_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, VOCAB, generator=gen)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5) for i in range(40)]
    out = sampler()(logits.clone(), batch_of(*(make_request(p) for p in params)))
    greedy = logits.argmax(dim=1).tolist()
    assert [out.token_ids[i] for i in range(1, 40, 2)] == greedy[1::2]
    assert [out.token_ids[i] for i in range(0, 40, 2)] != greedy[0::2]


def sample_rows(params: SamplingParams, row: list[float], rows: int = 400, seed: int = 0) -> list[int]:
    logits = torch.tensor([row] * rows)
    return sampler(len(row), seed)(logits, batch_of(*(make_request(params) for _ in range(rows)))).token_ids


PROBS = [0.5, 0.3, 0.12, 0.05, 0.03]
LOG_PROBS = [math.log(p) for p in PROBS]


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=3, temperature=3.0), {0, 1, 2}),
        (SamplingParams(top_p=0.75), {0, 1}),
        (SamplingParams(top_p=0.85), {0, 1, 2}),
        (SamplingParams(min_p=0.2), {0, 1, 2}),
        (SamplingParams(min_p=0.5), {0, 1}),
        (SamplingParams(top_k=3, top_p=0.7), {0, 1}),
    ],
    ids=["top_k=2", "top_k=3,T=3", "top_p=.75", "top_p=.85", "min_p=.2", "min_p=.5", "k+p"],
)
def test_filters_never_sample_outside_the_allowed_set(params: SamplingParams, allowed: set) -> None:
    tokens = sample_rows(params, LOG_PROBS)
    assert set(tokens) == allowed  # every allowed token drawn, nothing else


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampled_frequencies_match_the_tempered_distribution(temperature: float) -> None:
    rows = 4000
    tokens = torch.tensor(sample_rows(SamplingParams(temperature=temperature), LOG_PROBS, rows))
    frequencies = torch.bincount(tokens, minlength=len(PROBS)).float() / rows
    expected = torch.softmax(torch.tensor(LOG_PROBS) / temperature, dim=0)
    assert torch.allclose(frequencies, expected, atol=0.03)


def test_unseeded_sampling_is_reproducible_from_the_engine_seed() -> None:
    row = [0.0] * VOCAB
    assert sample_rows(SamplingParams(), row, 50, seed=3) == sample_rows(SamplingParams(), row, 50, seed=3)
    assert sample_rows(SamplingParams(), row, 50, seed=3) != sample_rows(SamplingParams(), row, 50, seed=4)


# -- seeded requests ----------------------------------------------------------------------------


def generate(rows: list[tuple[str, SamplingParams, int]], order: list[int], steps: int, seed: int):
    """Decode ``steps`` tokens for the rows (name, params, index) batched in ``order``, with
    logits that depend on the request only; returns name -> tokens."""
    requests = {name: make_request(p, index=index) for name, p, index in rows}
    engine_sampler = sampler(VOCAB, seed)
    for step in range(steps):
        batch = batch_of(*(requests[rows[i][0]] for i in order))
        logits = torch.stack(
            [torch.linspace(0.0, 1.0 + step / 10, VOCAB) for _ in batch.requests]
        )
        for request, token in zip(batch.requests, engine_sampler(logits, batch).token_ids):
            request.append_output_token(token)
    return {name: r.output_token_ids for name, r in requests.items()}


def test_seeded_rows_do_not_depend_on_batch_mates_or_order() -> None:
    seeded = ("seeded", SamplingParams(seed=42, top_k=6), 0)
    alone = generate([seeded], [0], steps=12, seed=0)["seeded"]
    mates = [
        seeded,
        ("other_seed", SamplingParams(seed=7), 0),
        ("unseeded", SamplingParams(), 0),
        ("greedy", SamplingParams(temperature=0.0, seed=1), 0),
    ]
    for order, engine_seed in [([0, 1, 2, 3], 1), ([3, 2, 1, 0], 2), ([2, 0, 3, 1], 3)]:
        assert generate(mates, order, steps=12, seed=engine_seed)["seeded"] == alone


def test_seeded_siblings_differ_by_index_and_repeat_by_seed() -> None:
    params = SamplingParams(seed=5)
    rows = [("a", params, 0), ("b", params, 1), ("c", params, 0)]
    tokens = generate(rows, [0, 1, 2], steps=16, seed=0)
    assert tokens["a"] == tokens["c"]
    assert tokens["a"] != tokens["b"]


# -- logprobs -----------------------------------------------------------------------------------


def expected_entry(logprobs: torch.Tensor, token: int) -> Logprob:
    value = logprobs[token]
    return Logprob(pytest.approx(value.item(), abs=1e-6), int((logprobs > value).sum()) + 1)


def test_sample_logprobs_come_from_raw_logits_with_ranks() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, VOCAB, generator=gen)
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        SamplingParams(logprobs=3, logit_bias={int(logits[0].argmin()): 50.0}),
        SamplingParams(logprobs=0, temperature=0.7),
        SamplingParams(),
    ]
    out = sampler()(logits.clone(), batch_of(*(make_request(p) for p in params)))
    assert out.token_ids[0] == int(logits[0].argmin())  # the bias decided the sample...
    top3 = raw[0].topk(3).indices.tolist()
    assert set(out.logprobs[0]) == {out.token_ids[0], *top3}  # ...but logprobs are the raw ones
    for token, entry in out.logprobs[0].items():
        assert entry == expected_entry(raw[0], token)
    assert out.logprobs[0][out.token_ids[0]].rank == VOCAB
    assert [e.rank for t, e in out.logprobs[0].items() if t in top3] == [1, 2, 3]
    assert list(out.logprobs[1]) == [out.token_ids[1]]
    assert out.logprobs[1][out.token_ids[1]] == expected_entry(raw[1], out.token_ids[1])
    assert out.logprobs[2] is None


def test_rank_counts_only_strictly_larger_logprobs() -> None:
    logits = torch.tensor([[2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0]])
    entries = compute_prompt_logprobs(logits, torch.tensor([3]), num_logprobs=4)[0]
    assert {t: e.rank for t, e in entries.items()} == {0: 1, 1: 1, 2: 3, 3: 3}


def test_prompt_logprobs_hold_the_target_and_the_top_k() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, VOCAB, generator=gen)
    targets = torch.tensor([0, 1, 2, 3, int(logits[4].argmax())])
    entries = compute_prompt_logprobs(logits, targets, num_logprobs=2)
    raw = torch.log_softmax(logits, dim=-1)
    assert len(entries) == 5
    for row, (entry, target) in enumerate(zip(entries, targets.tolist())):
        top2 = raw[row].topk(2).indices.tolist()
        assert set(entry) == {target, *top2}
        for token, logprob in entry.items():
            assert logprob == expected_entry(raw[row], token)
    assert len(entries[4]) == 2  # the target is itself in the top 2
    assert [list(e) for e in compute_prompt_logprobs(logits, targets, 0)] == [[t] for t in targets.tolist()]


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 5), width=st.integers(1, 300), levels=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       specials=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 299), st.sampled_from(["nan", "inf", "-inf"])),
                         max_size=4))
def test_argmax_is_torchs_first_index_of_the_largest(rows, width, levels, seed, specials) -> None:
    """The sliced argmax (forced on for every shape here, in slices of 8) against torch's: few
    distinct values, so ties across and within slices are common, and NaN and infinities at
    random places."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, width), generator=generator).float()
    for row, column, value in specials:
        if row < rows and column < width:
            logits[row, column] = float(value)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "ARGMAX_MIN_ELEMENTS", 0)
        patch.setattr(sampling, "ARGMAX_SLICE", 8)
        assert torch.equal(sampling.argmax(logits), logits.argmax(dim=-1))
