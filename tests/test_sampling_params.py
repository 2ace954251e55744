import re

import pytest

from pagedserve.core.sampling_params import MAX_LOGPROBS, SamplingParams

INVALID = [
    ("n", {"n": 0}),
    ("n", {"n": True}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": "hot"}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": 2.5}),
    ("min_p", {"min_p": 1.5}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -2.5}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("logit_bias", {"logit_bias": [1, 2]}),
    ("logit_bias", {"logit_bias": {"x": 1.0}}),
    ("logit_bias", {"logit_bias": {3: 101.0}}),
    ("seed", {"seed": "42"}),
    ("stop", {"stop": ""}),
    ("stop", {"stop": ["ok", 3]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("max_tokens", {"max_tokens": 0}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("logprobs", {"logprobs": MAX_LOGPROBS + 1}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
    ("extra_args", {"extra_args": ["x"]}),
    ("best_of", {"best_of": 0}),
    ("best_of", {"n": 3, "best_of": 2}),
    ("bad_words", {"bad_words": [""]}),
    ("bad_words", {"bad_words": [3]}),
    ("allowed_token_ids", {"allowed_token_ids": []}),
    ("allowed_token_ids", {"allowed_token_ids": [-1]}),
    ("truncate_prompt_tokens", {"truncate_prompt_tokens": 0}),
    ("truncate_prompt_tokens", {"truncate_prompt_tokens": -2}),
    ("logits_processors", {"logits_processors": ["not callable"]}),
    ("output_kind", {"output_kind": 3}),
    ("detokenize", {"detokenize": "no"}),
    ("detokenize", {"detokenize": False, "stop": ["x"]}),
    ("spaces_between_special_tokens", {"spaces_between_special_tokens": None}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_invalid_field_raises_value_error_naming_it(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(field)}"):
        SamplingParams(**kwargs)


def test_defaults_are_valid_and_not_greedy() -> None:
    params = SamplingParams()
    assert params.stop == [] and params.stop_token_ids == []
    assert not params.greedy


def test_normalisation() -> None:
    params = SamplingParams(top_k=-1, stop="###", logit_bias={"7": 1}, temperature=0)
    assert params.top_k == 0
    assert params.stop == ["###"]
    assert params.logit_bias == {7: 1.0}
    assert params.greedy


def test_clone_changes_a_field_and_validates_again() -> None:
    params = SamplingParams(stop=["a"], seed=3)
    copy = params.clone(temperature=0.5)
    assert copy.temperature == 0.5 and copy.stop == ["a"] and copy.seed == 3
    assert params.temperature == 1.0
    with pytest.raises(ValueError, match="^top_p"):
        params.clone(top_p=2.0)


# -- structured outputs -------------------------------------------------------------------------


def test_structured_outputs_params_take_exactly_one_constraint() -> None:
    from pagedserve import StructuredOutputsParams

    assert StructuredOutputsParams(json='{"type": "object"}').json == {"type": "object"}
    assert StructuredOutputsParams(choice=("a", "b")).kind == "choice"
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    with pytest.raises(ValueError, match="exactly one of .*got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="got regex, choice"):
        StructuredOutputsParams(regex="a+", choice=["a"])
    with pytest.raises(ValueError, match="json is not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="must be a JSON schema"):
        StructuredOutputsParams(json="[1, 2]")
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="non-empty strings only"):
        StructuredOutputsParams(choice=["a", 3])
    with pytest.raises(ValueError, match="regex must be a non-empty string"):
        StructuredOutputsParams(regex="  ")
    with pytest.raises(ValueError, match="must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})


def test_vllm_extras_normalise() -> None:
    from pagedserve.core.sampling_params import RequestOutputKind

    params = SamplingParams(n=2, best_of=3, bad_words="oops", output_kind=1, logits_processors=(print,))
    assert params.num_sequences == 3 and SamplingParams(n=2).num_sequences == 2
    assert params.bad_words == ["oops"] and params.logits_processors == [print]
    assert params.output_kind is RequestOutputKind.DELTA
