"""vLLM's sampling fields beyond OpenAI's, end to end through the engine on a tiny model:
bad_words, allowed_token_ids, truncate_prompt_tokens, per-request logits_processors,
output_kind, detokenize=False, spaces_between_special_tokens and best_of."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.core.request import RequestStatus
from pagedserve.core.sampling_params import RequestOutputKind
from pagedserve.core.tokenizer import IncrementalDetokenizer

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model()), dtype="float32", max_model_len=128, block_size=4, num_kv_blocks=256)


def generate(llm: LLM, prompt: object = PROMPT, **fields: object) -> list:
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True, **fields})
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs


def run_engine(llm: LLM, request_id: str, params: SamplingParams) -> list:
    """Every output the engine reports for one request, in order."""
    engine = llm.engine
    engine.add_request(request_id, PROMPT, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(o for o in engine.step() if o.request_id == request_id)
    return outputs


def test_bad_words_are_never_generated_and_change_nothing_else(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    baseline = generate(llm)[0].token_ids

    def whole_word(token: int) -> bool:  # a token whose text tokenizes back to it
        word = tokenizer.decode([token]).lstrip()
        encodings = (tokenizer.encode(p + word, add_special_tokens=False) for p in ("", " "))
        return bool(word) and [token] in encodings

    i = next(i for i, t in enumerate(baseline) if whole_word(t))
    banned = generate(llm, bad_words=[tokenizer.decode([baseline[i]])])[0].token_ids
    assert baseline[i] not in banned
    assert banned[:i] == baseline[:i] and banned != baseline
    # A two-token word: its last token is banned only right after its first.
    pair = tokenizer.decode(baseline[3:5])
    ids = tokenizer.encode(pair.lstrip(), add_special_tokens=False)
    if len(ids) == 2:
        out = generate(llm, bad_words=[pair])[0].token_ids
        assert all(out[i : i + 2] != ids for i in range(len(out) - 1))


def test_allowed_token_ids_restrict_every_token(llm: LLM) -> None:
    allowed = [5, 17, 99, 300]
    for temperature in (0.0, 1.0):
        out = generate(llm, allowed_token_ids=allowed, temperature=temperature, seed=1)[0].token_ids
        assert out and set(out) <= set(allowed)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        generate(llm, allowed_token_ids=[10**6])


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(PROMPT * 3)
    truncated = llm.generate(PROMPT * 3, SamplingParams(temperature=0.0, max_tokens=8, truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert truncated.prompt_token_ids == ids[-5:]
    direct = llm.generate({"prompt_token_ids": ids[-5:]}, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert truncated.outputs[0].token_ids == direct.outputs[0].token_ids
    everything = llm.generate(PROMPT, SamplingParams(max_tokens=2, truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert everything.prompt_token_ids == llm.get_tokenizer().encode(PROMPT)


def test_per_request_logits_processors_steer_only_their_request(llm: LLM) -> None:
    calls = []

    def force_token(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        calls.append(len(output_ids))
        logits[:] = float("-inf")
        logits[42] = 0.0
        return logits

    params = [
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logits_processors=[force_token]),
        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
    ]
    steered, plain = llm.generate([PROMPT, PROMPT], params, use_tqdm=False)
    assert steered.outputs[0].token_ids == [42] * 5
    assert plain.outputs[0].token_ids == generate(llm, max_tokens=5)[0].token_ids
    assert calls == [0, 1, 2, 3, 4]


def test_output_kinds_report_the_same_tokens(llm: LLM) -> None:
    fields = {"temperature": 0.0, "max_tokens": 10, "ignore_eos": True, "logprobs": 1}
    cumulative = run_engine(llm, "c", SamplingParams(**fields))
    delta = run_engine(llm, "d", SamplingParams(**fields, output_kind=RequestOutputKind.DELTA))
    final = run_engine(llm, "f", SamplingParams(**fields, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(cumulative) == len(delta) == 10 and len(final) == 1 and final[0].finished
    last = cumulative[-1].outputs[0]
    assert final[0].outputs[0].token_ids == last.token_ids and final[0].outputs[0].text == last.text
    assert [t for o in delta for t in o.outputs[0].token_ids] == last.token_ids
    assert all(len(o.outputs[0].token_ids) == 1 for o in delta)
    assert "".join(o.outputs[0].text for o in delta) == last.text
    # The same entries; the values within float32 rounding: a later run's prefill can reuse the
    # earlier one's cached blocks, so its first token comes from a shorter prefill.
    reported = [lp for o in delta for lp in o.outputs[0].logprobs]
    assert [{t: (e.rank, e.decoded_token) for t, e in entry.items()} for entry in reported] == [
        {t: (e.rank, e.decoded_token) for t, e in entry.items()} for entry in last.logprobs]
    assert [e.logprob for entry in reported for e in entry.values()] == pytest.approx(
        [e.logprob for entry in last.logprobs for e in entry.values()], abs=1e-5)
    assert delta[-1].outputs[0].cumulative_logprob == pytest.approx(last.cumulative_logprob)
    assert last.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(last.logprobs, last.token_ids)))


def test_delta_reports_prompt_logprobs_once(llm: LLM) -> None:
    params = SamplingParams(max_tokens=3, prompt_logprobs=1, output_kind=RequestOutputKind.DELTA)
    outputs = run_engine(llm, "p", params)
    assert outputs[0].prompt_logprobs is not None and len(outputs[0].prompt_logprobs) == len(outputs[0].prompt_token_ids)
    assert all(o.prompt_logprobs is None for o in outputs[1:])


def test_detokenize_false_gives_token_ids_without_text(llm: LLM) -> None:
    plain = generate(llm, logprobs=1)[0]
    raw = generate(llm, logprobs=1, detokenize=False)[0]
    assert raw.token_ids == plain.token_ids and plain.text
    assert raw.text == ""
    assert all(lp.decoded_token is None for entry in raw.logprobs for lp in entry.values())


def test_spaces_between_special_tokens_as_vllms_fast_detokenizer(llm: LLM) -> None:
    """A word-level tokenizer whose decoder joins tokens with spaces: without
    spaces_between_special_tokens, a special token right after another loses its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<a>", "<b>"]})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("hello", "<a>", "<b>", "world")]

    def text(**fields: object) -> str:
        detok = IncrementalDetokenizer(tokenizer, [0], SamplingParams(**fields))
        detok.update(ids)
        return detok.text

    assert text(skip_special_tokens=False) == " hello <a> <b> world"
    assert text(skip_special_tokens=False, spaces_between_special_tokens=False) == " hello <a><b> world"
    assert text(spaces_between_special_tokens=False) == text() == " hello world"
    assert generate(llm, spaces_between_special_tokens=False)[0].token_ids == generate(llm)[0].token_ids


def test_best_of_returns_the_n_most_likely_of_best_of_samples(llm: LLM) -> None:
    engine = llm.engine
    params = SamplingParams(n=2, best_of=5, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    engine.add_request("best", PROMPT, params)
    group = engine._groups["best"]
    sequences = list(group.sequences)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(o for o in engine.step() if o.request_id == "best")
    (final,) = outputs  # nothing reported before the n best are known
    assert final.finished and len(sequences) == 5
    scores = sorted((s.cumulative_logprob for s in sequences), reverse=True)
    assert [c.cumulative_logprob for c in final.outputs] == pytest.approx(scores[:2])
    assert [c.index for c in final.outputs] == [0, 1]
    assert all(c.logprobs is None for c in final.outputs)
    by_score = {s.cumulative_logprob: s.output_token_ids for s in sequences}
    assert [c.token_ids for c in final.outputs] == [by_score[s] for s in scores[:2]]
    assert all(s.status is RequestStatus.FINISHED_LENGTH for s in sequences)
    assert engine.kv_cache.num_used_blocks == 0
    # The same through LLM.generate; best_of = n is plain n-way sampling.
    (result,) = llm.generate(PROMPT, params, use_tqdm=False)
    assert [c.token_ids for c in result.outputs] == [c.token_ids for c in final.outputs]
    assert len(generate(llm, n=2, best_of=2, temperature=1.0)) == 2


def test_best_of_siblings_share_the_prompt_blocks(llm: LLM) -> None:
    engine = llm.engine
    prompt = {"prompt_token_ids": list(range(3, 43))}  # 40 tokens = 10 blocks of 4
    engine.add_request("share", prompt, SamplingParams(n=1, best_of=4, max_tokens=3, ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        running = [s for s in engine._groups["share"].sequences if not s.is_finished] if "share" in engine._groups else []
        if running:
            held.append(len({b for s in running for b in s.block_ids}))
    # 4 sequences alone would hold 4 x 11 blocks; shared, the 9 full prompt blocks count once.
    assert held and max(held) <= 9 + 4 * 2
    assert engine.kv_cache.num_used_blocks == 0
