"""Beam search against transformers' generate(num_beams=W, do_sample=False): the same beams,
token for token, on tiny Llama and Mistral models, with and without EOS, over length penalties
and early-stopping modes; the block manager's invariants after every step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pagedserve import LLM, BeamSearchParams
from pagedserve.core.engine import LLMEngine

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\nclass Config:"]
MAX_TOKENS = 10
#: (architecture, beam width, EOS, length_penalty, early_stopping). EOS: none, the token greedy
#: decoding makes 4 steps in ("later"), or its first token ("first": beams end from the start).
CASES = [
    ("LlamaForCausalLM", 2, "first", 1.0, True),
    ("MistralForCausalLM", 4, "first", 0.0, False),
    ("LlamaForCausalLM", 2, None, 1.0, False),
    ("LlamaForCausalLM", 4, None, 0.0, "never"),
    ("LlamaForCausalLM", 2, "later", 1.0, False),
    ("LlamaForCausalLM", 4, "later", 2.0, True),
    ("LlamaForCausalLM", 4, "later", -1.0, "never"),
    ("MistralForCausalLM", 2, None, 1.5, "never"),
    ("MistralForCausalLM", 4, None, 1.0, True),
    ("MistralForCausalLM", 2, "later", 0.5, "never"),
    ("MistralForCausalLM", 4, "later", 1.0, False),
]
MODEL_OVERRIDES = {"LlamaForCausalLM": {}, "MistralForCausalLM": {"sliding_window": 8}}


@pytest.fixture(scope="module")
def models(tiny_model) -> dict[str, tuple[Path, LLM, object]]:
    built = {}
    for architecture, overrides in MODEL_OVERRIDES.items():
        folder = tiny_model(architecture, **overrides)
        llm = LLM(str(folder), dtype="float32", max_model_len=128, block_size=4, num_kv_blocks=200)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        built[architecture] = (folder, llm, hf)
    return built


def frequent_token(hf: object, ids: torch.Tensor, steps: int) -> int:
    """The token greedy decoding produces ``steps`` in: as EOS, it ends some beams early."""
    out = hf.generate(ids, max_new_tokens=steps, do_sample=False, attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=2)
    return int(out[0, -1])


def hf_beams(hf: object, ids: torch.Tensor, width: int, eos: int | None, penalty: float, early: bool | str):
    config = GenerationConfig(
        num_beams=width, num_return_sequences=width, do_sample=False, max_new_tokens=MAX_TOKENS,
        length_penalty=penalty, early_stopping=early, eos_token_id=eos, pad_token_id=2,
        return_dict_in_generate=True, output_scores=True,
    )
    out = hf.generate(ids, generation_config=config, attention_mask=torch.ones_like(ids))
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    beams = [out.sequences[i, ids.shape[1] : ids.shape[1] + n].tolist() for i, n in enumerate(lengths)]
    return beams, out.sequences_scores.tolist()


def check_blocks(engine: LLMEngine) -> None:
    """Every block's reference count is the number of sequences holding it."""
    owners = Counter(b for r in engine.scheduler.requests.values() for b in r.block_ids)
    pool = engine.kv_cache.pool
    assert all(pool.ref_counts[b] == owners.get(b, 0) for b in range(pool.num_blocks))


def run_beam_search(engine: LLMEngine, prompt_ids: list[int], params: BeamSearchParams) -> object:
    engine.add_beam_search_request("beam", {"prompt_token_ids": prompt_ids}, params)
    group = engine._groups["beam"]
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        check_blocks(engine)
    assert engine.kv_cache.num_used_blocks == 0  # no leak
    (output,) = outputs  # one output, at the end
    return output, group.generated


@pytest.mark.parametrize(("architecture", "width", "eos_kind", "penalty", "early"), CASES)
def test_beams_identical_to_transformers(models, monkeypatch, architecture, width, eos_kind, penalty, early) -> None:
    folder, llm, hf = models[architecture]
    engine = llm.engine
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ended_by_eos = 0
    stopped_early = False
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with_eos = eos_kind is not None
        eos = frequent_token(hf, ids, 1 if eos_kind == "first" else 4) if with_eos else None
        expected, scores = hf_beams(hf, ids, width, eos, penalty, early)
        monkeypatch.setattr(engine, "eos_token_ids", (eos,) if with_eos else ())
        params = BeamSearchParams(
            beam_width=width, max_tokens=MAX_TOKENS, length_penalty=penalty, early_stopping=early,
            ignore_eos=not with_eos, include_stop_str_in_output=True,
        )
        output, steps = run_beam_search(engine, ids[0].tolist(), params)
        stopped_early |= steps < MAX_TOKENS
        assert [c.token_ids for c in output.outputs] == expected
        for completion, score in zip(output.outputs, scores):
            assert completion.cumulative_logprob / len(completion.token_ids) ** penalty == pytest.approx(score, abs=1e-4)
        ended_by_eos += sum(c.finish_reason == "stop" for c in output.outputs)
    print(f"EOS-ended beams: {ended_by_eos}, stopped early: {stopped_early}")
    if eos_kind is None:
        assert ended_by_eos == 0 and not stopped_early
    if eos_kind == "first":
        assert ended_by_eos > 0
        if early is True:  # all beams finished: the search ended before max_tokens
            assert stopped_early


def test_llm_beam_search_api(models) -> None:
    _, llm, _ = models["LlamaForCausalLM"]
    tokenizer = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    results = llm.beam_search([{"prompt": p} for p in PROMPTS] + [PROMPTS[0]], params)
    assert len(results) == 3
    for result, prompt in zip(results, [*PROMPTS, PROMPTS[0]]):
        prompt_ids = tokenizer.encode(prompt)
        assert len(result.sequences) == 3
        for seq in result.sequences:
            assert seq.tokens[: len(prompt_ids)] == prompt_ids and len(seq.tokens) == len(prompt_ids) + 6
            assert seq.text == tokenizer.decode(seq.tokens, skip_special_tokens=True)
            assert seq.finish_reason == "length" and len(seq.logprobs) == 6
        cums = [s.cum_logprob for s in result.sequences]
        assert cums == sorted(cums, reverse=True)
    assert [s.tokens for s in results[0].sequences] == [s.tokens for s in results[2].sequences]
    assert llm.engine.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("beam_width", {"beam_width": 0, "max_tokens": 4}),
        ("beam_width", {"beam_width": 11, "max_tokens": 4}),
        ("max_tokens", {"beam_width": 2, "max_tokens": 0}),
        ("length_penalty", {"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}),
        ("early_stopping", {"beam_width": 2, "max_tokens": 4, "early_stopping": "sometimes"}),
        ("temperature", {"beam_width": 2, "max_tokens": 4, "temperature": -1.0}),
    ],
)
def test_invalid_beam_search_params_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        BeamSearchParams(**kwargs)


def test_beams_survive_preemption_with_the_same_result(models) -> None:
    """A cache too small for the beams and three other requests: beams are preempted and
    recomputed (a seat given to a preempted beam too), the blocks stay consistent every step,
    and the beams are those of an uncontended run."""
    from pagedserve import SamplingParams

    folder, llm, _ = models["LlamaForCausalLM"]
    params = BeamSearchParams(beam_width=4, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(3, 23))}
    (expected,) = llm.beam_search([prompt], params)
    engine = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=24, max_num_seqs=8).engine
    engine.add_beam_search_request("beam", prompt, params)
    beams = engine._groups["beam"].sequences
    for i in range(3):
        engine.add_request(f"other-{i}", {"prompt_token_ids": list(range(40 + i, 50 + i))},
                           SamplingParams(max_tokens=20, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        check_blocks(engine)
    assert sum(b.num_preemptions for b in beams) > 0  # beams themselves were preempted
    assert engine.kv_cache.num_used_blocks == 0
    (beam,) = [o for o in outputs if o.request_id == "beam"]
    assert [c.token_ids for c in beam.outputs] == [s.tokens[20:] for s in expected.sequences]
