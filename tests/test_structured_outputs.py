"""Structured output offline, on a tiny random model: every output is checked against its schema,
regex or choice; the constraint composes with n > 1, seeds, stop strings, max_tokens and
preemption; bad schemas are ValueErrors; grammars compile off the engine loop while the others
run; unconstrained rows are untouched."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.plugins.structured.processor import StructuredOutputsProcessor

pytestmark = pytest.mark.slow

PROMPTS = ["def parse(text):", "import json\n", "class Point:", "# A record\n", "x = {", "return"]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=130)
    role: Literal["admin", "user", "guest"]
    active: bool
    tags: list[Annotated[str, Field(max_length=4)]] = Field(max_length=2)


SCHEMA = Person.model_json_schema()


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model()


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(str(model_dir), dtype="float32", max_model_len=256, max_num_seqs=16)


def structured(**kwargs) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kwargs)


def texts(outputs) -> list[str]:
    return [c.text for o in outputs for c in o.outputs]


def test_json_schema_outputs_validate(llm: LLM) -> None:
    params = SamplingParams(
        n=2, temperature=0.9, seed=3, max_tokens=200, structured_outputs=structured(json=SCHEMA)
    )
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for output in outputs:
        for completion in output.outputs:
            assert completion.finish_reason == "stop", completion.text
            Person.model_validate_json(completion.text)
    # n > 1 sequences each follow the grammar on their own: they differ, and all validate.
    assert len({c.text for o in outputs for c in o.outputs}) > len(PROMPTS)


def test_seeded_constrained_sampling_repeats(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=120, structured_outputs=structured(json=SCHEMA))
    first = texts(llm.generate(PROMPTS[:3], params, use_tqdm=False))
    again = texts(llm.generate(PROMPTS[:3], params, use_tqdm=False))
    assert first == again


def test_regex_choice_grammar_and_json_object(llm: LLM) -> None:
    regex = r"[A-Z]{2}-[0-9]{3}"
    choices = ["red", "green", "blue sky"]
    outputs = llm.generate(
        PROMPTS,
        [
            SamplingParams(temperature=1.0, seed=i, max_tokens=30, structured_outputs=spec)
            for i, spec in enumerate(
                [
                    structured(regex=regex),
                    structured(choice=choices),
                    structured(grammar='root ::= "yes" | "no" | "maybe " [0-9]'),
                    structured(grammar='start: "on" | "off"'),
                    structured(json_object=True),
                    structured(json='{"type": "array", "items": {"type": "integer"}, "maxItems": 4}'),
                ]
            )
        ],
        use_tqdm=False,
    )
    regex_out, choice_out, ebnf_out, lark_out, object_out, array_out = (o.outputs[0] for o in outputs)
    assert re.fullmatch(regex, regex_out.text) and regex_out.finish_reason == "stop"
    assert choice_out.text in choices
    assert re.fullmatch(r"yes|no|maybe [0-9]", ebnf_out.text)
    assert lark_out.text in ("on", "off")
    if object_out.finish_reason == "stop":
        assert isinstance(json.loads(object_out.text), dict)
    else:  # cut at max_tokens: still the start of an object
        assert object_out.text.startswith("{")
    values = json.loads(array_out.text)
    assert isinstance(values, list) and len(values) <= 4 and all(isinstance(v, int) for v in values)


def test_max_tokens_cuts_a_constrained_output_and_returns_the_part(llm: LLM) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=structured(json=SCHEMA))
    (full,) = llm.generate(PROMPTS[0], free, use_tqdm=False)
    (cut,) = llm.generate(PROMPTS[0], free.clone(max_tokens=5), use_tqdm=False)
    assert cut.outputs[0].finish_reason == "length"
    assert cut.outputs[0].token_ids == full.outputs[0].token_ids[:5]
    assert full.outputs[0].text.startswith(cut.outputs[0].text)


def test_stop_strings_end_a_constrained_output(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=structured(json=SCHEMA))
    (full,) = llm.generate(PROMPTS[1], params, use_tqdm=False)
    stop = '"age"'
    (stopped,) = llm.generate(PROMPTS[1], params.clone(stop=[stop]), use_tqdm=False)
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    assert stopped.outputs[0].text == full.outputs[0].text.split(stop)[0]


def test_unconstrained_rows_are_untouched(llm: LLM) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    alone = texts(llm.generate(PROMPTS, plain, use_tqdm=False))
    mixed = llm.generate(
        PROMPTS + PROMPTS,
        [plain] * len(PROMPTS) + [plain.clone(structured_outputs=structured(json=SCHEMA))] * len(PROMPTS),
        use_tqdm=False,
    )
    assert texts(mixed[: len(PROMPTS)]) == alone
    for output in mixed[len(PROMPTS) :]:
        assert output.outputs[0].text.startswith("{")


def test_preemption_keeps_the_matcher_in_step(llm: LLM, model_dir) -> None:
    """A KV cache so small that requests are preempted and recomputed: the grammar state follows
    the output tokens, so the greedy outputs equal those of an unpressured engine."""
    params = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=structured(json=SCHEMA))
    expected = texts(llm.generate(PROMPTS, params, use_tqdm=False))
    small = LLM(str(model_dir), dtype="float32", max_model_len=256, block_size=4, num_kv_blocks=40)
    outputs = small.generate(PROMPTS, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions_total > 0
    assert texts(outputs) == expected


BAD_SPECS = [
    (dict(json={"type": "integer", "minimum": 5, "maximum": 2}), "json: invalid JSON schema: Invalid range"),
    (dict(json={"type": "strng"}), 'Unsupported type "strng"'),
    (dict(json={"type": "string", "minLength": 9, "maxLength": 2}), "minLength 9 is greater than maxLength 2"),
    (dict(regex="[a-z"), "regex: invalid regex"),
    (dict(grammar="root ::= missing"), 'Rule "missing" is not defined'),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_invalid_schemas_and_grammars_are_value_errors(llm: LLM, spec, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate("x", SamplingParams(structured_outputs=structured(**spec)), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_used_blocks == 0


def _processor(llm: LLM) -> StructuredOutputsProcessor:
    (processor,) = [p for p in llm.engine.runner.sampler.processors if isinstance(p, StructuredOutputsProcessor)]
    return processor


def test_compiled_grammars_are_cached_by_text(llm: LLM) -> None:
    processor = _processor(llm)
    engine = llm.engine
    params = SamplingParams(structured_outputs=structured(json=json.dumps(SCHEMA)))
    engine.add_request("cache-a", "a", params)
    engine.add_request("cache-b", "b", params.clone(structured_outputs=structured(json=dict(SCHEMA))))
    first, second = (engine.scheduler.get_request(r) for r in ("cache-a", "cache-b"))
    # The schema as text and as a dict is one grammar: one compile, one future for both.
    assert len(first.pending) == 1 and first.pending[0] is second.pending[0]
    assert processor._compiled[("json", json.dumps(SCHEMA))] is first.pending[0]
    engine.abort_request(["cache-a", "cache-b"])


def test_a_compiling_grammar_holds_only_its_own_request(llm: LLM, monkeypatch) -> None:
    """The compile runs on a worker thread; until it finishes its request waits in the
    scheduler and the other requests run; then it runs and validates."""
    processor = _processor(llm)
    release = threading.Event()
    started = threading.Event()
    real_pool = processor._pool()

    class GatedPool:
        def submit(self, fn, *args) -> Future:
            def gated():
                started.set()
                release.wait(30)
                return fn(*args)

            return real_pool.submit(gated)

    monkeypatch.setattr(processor, "_pool", lambda: GatedPool())
    schema = {**SCHEMA, "title": "PersonGated"}  # a text no cache has seen
    engine = llm.engine
    engine.add_request("slow", PROMPTS[0], SamplingParams(max_tokens=200, structured_outputs=structured(json=schema)))
    engine.add_request("plain", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=6))
    assert started.wait(10)
    finished = {}
    while "plain" not in finished:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    slow = engine.scheduler.get_request("slow")
    assert slow.num_computed_tokens == 0 and slow.output_token_ids == []
    release.set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    Person.model_validate_json(finished["slow"].outputs[0].text)


def test_speculative_decoding_composes_with_constraints(llm: LLM, model_dir) -> None:
    """n-gram proposals are verified under the grammar: greedy constrained outputs equal those
    without speculation, and sampled ones validate."""
    spec = LLM(
        str(model_dir), dtype="float32", max_model_len=256,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                            "disable_by_batch_size": 0},
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=structured(json=SCHEMA))
    prompts = [p + ' {"name": "ab", "age": 1, "role": "user"}' for p in PROMPTS[:4]]  # n-gram fodder
    speculated = spec.generate(prompts, greedy, use_tqdm=False)
    assert texts(speculated) == texts(llm.generate(prompts, greedy, use_tqdm=False))
    assert sum(o.metrics["spec_num_accepted_tokens"] for o in speculated) > 0
    sampled = greedy.clone(temperature=1.0, seed=5, max_tokens=120)
    for output in spec.generate(prompts, sampled, use_tqdm=False):
        Person.model_validate_json(output.outputs[0].text)
