import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_tokenizer import train_tokenizer

from pagedserve.core.sampling_params import SamplingParams
from pagedserve.core.tokenizer import (
    IncrementalDetokenizer,
    apply_chat_template,
    get_eos_token_ids,
    load_tokenizer,
)

VOCAB = 512
MIXED_TEXT = "def 世界(x): return '🎉 naïve café' # 東京 ok"
HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return load_tokenizer(str(tokenizer_dir))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def detokenize(tokenizer, prompt: str, ids: list[int], **params) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt), SamplingParams(**params))
    for token in ids:
        if detok.update([token]):
            break
    return detok


# -- the tiny tokenizer and loading ----------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [300, VOCAB])
def test_tiny_tokenizer_has_exactly_the_vocabulary_size(tmp_path: Path, vocab_size: int) -> None:
    tokenizer = load_tokenizer(str(train_tokenizer(tmp_path, vocab_size)))
    assert len(tokenizer) == vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)


def test_tiny_tokenizer_round_trips_multibyte_text(tokenizer) -> None:
    ids = encode(tokenizer, MIXED_TEXT)
    assert tokenizer.decode(ids) == MIXED_TEXT
    assert len(encode(tokenizer, "🎉")) > 1  # the emoji spans several tokens


def test_load_tokenizer_from_a_folder_without_one_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize(
    ("generation_config", "expected"),
    [
        ({}, (1,)),
        ({"eos_token_id": 7}, (7, 1)),
        ({"eos_token_id": [1, 9]}, (1, 9)),
        ({"eos_token_id": None}, (1,)),
    ],
)
def test_eos_token_ids(tokenizer, generation_config: dict, expected: tuple) -> None:
    assert get_eos_token_ids(tokenizer, generation_config) == expected


# -- chat templates -------------------------------------------------------------------------------


def test_chat_template_renders_turns_and_generation_prompt(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    expected = "<s><|system|>\nBe brief.\n<|user|>\nHi\nthere\n<|assistant|>\n"
    ids = apply_chat_template(tokenizer, messages)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids) == expected
    without_prompt = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
    assert tokenizer.decode(without_prompt) == expected.removesuffix("<|assistant|>\n")


def test_chat_content_parts_other_than_text_are_refused(tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="image_url"):
        apply_chat_template(tokenizer, messages)


def test_tokenizer_without_chat_template_is_a_clear_error(tokenizer_dir: Path) -> None:
    plain = load_tokenizer(str(tokenizer_dir))
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(plain, [{"role": "user", "content": "hi"}])


# -- incremental detokenization ------------------------------------------------------------------

TEXTS = st.text(alphabet=st.sampled_from(list("ab xé世界🎉東\n()")) | st.characters(codec="utf-8"), max_size=30)


@HYPOTHESIS
@given(prompt=TEXTS, text=TEXTS, chunks=st.randoms(use_true_random=False))
def test_incremental_text_equals_full_decode_of_valid_text(tokenizer, prompt, text, chunks) -> None:
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt), SamplingParams())
    deltas = []
    position = 0
    while position < len(ids):
        size = chunks.randint(1, 3)
        detok.update(ids[position : position + size])
        deltas.append(detok.get_delta())
        position += size
    deltas.append(detok.flush())
    assert detok.text == text == tokenizer.decode(ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


@HYPOTHESIS
@given(
    prompt=TEXTS,
    ids=st.lists(st.integers(0, VOCAB - 1), max_size=40),
    skip_special_tokens=st.booleans(),
)
def test_incremental_text_equals_full_decode_of_any_tokens(
    tokenizer, prompt, ids, skip_special_tokens
) -> None:
    detok = detokenize(tokenizer, prompt, ids, skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if full.endswith("\ufffd"):
        # An unfinished character at the end is held back, never emitted broken.
        assert full.startswith(detok.text)
    else:
        assert detok.text == full


def test_multibyte_characters_never_come_out_broken(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "say:"), SamplingParams())
    seen = []
    for token in encode(tokenizer, "🎉東京🎉"):
        detok.update([token])
        seen.append(detok.get_delta())
    assert "".join(seen) == "🎉東京🎉"
    assert "" in seen  # some tokens ended inside a character and were held back
    assert all("\ufffd" not in piece for piece in seen)


def test_first_token_decodes_in_the_context_of_the_prompt(tokenizer) -> None:
    prompt, completion = encode(tokenizer, "Hello"), encode(tokenizer, " world")
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    detok.update(completion)
    assert detok.text == " world"


def test_skip_special_tokens(tokenizer) -> None:
    ids = encode(tokenizer, "a b") + [tokenizer.eos_token_id] + encode(tokenizer, " c")
    assert detokenize(tokenizer, "", ids).text == "a b c"
    assert detokenize(tokenizer, "", ids, skip_special_tokens=False).text == "a b</s> c"


def test_decode_token(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    token = encode(tokenizer, " def")
    assert len(token) == 1
    assert detok.decode_token(token[0]) == " def"
    assert detok.decode_token(tokenizer.eos_token_id) == "</s>"


# -- stop strings ---------------------------------------------------------------------------------


def test_stop_string_cuts_the_text(tokenizer) -> None:
    ids = encode(tokenizer, "x = foo(1)\nreturn x")
    detok = detokenize(tokenizer, "", ids, stop=["foo("])
    assert detok.stop_string == "foo(" and detok.finished
    assert detok.text == "x = "
    assert len(detok.output_token_ids) < len(ids)


def test_stop_string_kept_with_include_stop_str_in_output(tokenizer) -> None:
    ids = encode(tokenizer, "x = foo(1)\nreturn x")
    detok = detokenize(tokenizer, "", ids, stop=["foo("], include_stop_str_in_output=True)
    assert detok.text == "x = foo("


def test_stop_string_spanning_tokens_is_found(tokenizer) -> None:
    text = "a = 1\n    return value + other"
    ids = encode(tokenizer, text)
    pieces = [tokenizer.decode([t]) for t in ids]
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(len(pieces) - 1) if len(pieces[i]) > 1 and len(pieces[i + 1]) > 1)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    start = len("".join(pieces[:i])) + len(pieces[i]) - 2
    assert text.find(stop) == start
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=[stop]))
    matched = [detok.update([token]) for token in ids[: i + 2]]
    assert matched == [None] * (i + 1) + [stop]
    assert detok.text == text[:start]


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["world", "o w"]))
    assert detok.update(encode(tokenizer, "hello world")) == "o w"
    assert detok.text == "hell"


def test_stop_token_is_left_out_of_the_text_unless_included(tokenizer) -> None:
    ids = encode(tokenizer, "ok") + [tokenizer.eos_token_id]
    for include, expected in [(False, "ok"), (True, "ok</s>")]:
        params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tokenizer, [], params)
        assert detok.update(ids, stop_terminated=True) is None
        assert detok.finished and detok.text == expected
        assert detok.get_delta() == expected


def test_flush_releases_a_held_back_partial_stop_string(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["</end>"]))
    detok.update(encode(tokenizer, "done </en"))
    assert detok.get_delta() == "done "
    assert detok.flush() == "</en"
    assert detok.text == "done </en"


@HYPOTHESIS
@given(
    words=st.lists(st.sampled_from(["ab", "c", " ", "STOP", "ST", "OP", "é", "🎉", "\n"]), max_size=20),
    stops=st.lists(st.sampled_from(["STOP", "c ab", "🎉\n", "OPé", "b"]), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_streamed_deltas_never_leak_a_stop_string(tokenizer, words, stops, include) -> None:
    text = "".join(words)
    detok = IncrementalDetokenizer(
        tokenizer, [], SamplingParams(stop=stops, include_stop_str_in_output=include)
    )
    streamed = ""
    for token in encode(tokenizer, text):
        stopped = detok.update([token])
        streamed += detok.get_delta()
        if stopped:
            break
        # Everything streamed while running is final text: no stop string, not even its start.
        assert not any(stop in streamed for stop in stops)
    streamed += detok.flush()
    assert streamed == detok.text
    first = min(((text.find(s), s) for s in stops if s in text), default=None)
    if first is None:
        assert detok.text == text and detok.stop_string is None
    else:
        index, stop = first
        assert detok.stop_string is not None
        assert detok.text == (text[: index + len(stop)] if include else text[:index])


def test_random_prompts_and_chunks_keep_deltas_consistent(tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(30):
        ids = encode(tokenizer, MIXED_TEXT)[: rng.randint(1, 30)]
        detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["café"]))
        streamed = ""
        while ids and not detok.finished:
            size = rng.randint(1, 4)
            detok.update(ids[:size])
            ids = ids[size:]
            streamed += detok.get_delta()
            assert detok.text.startswith(streamed)
        streamed += detok.flush()
        assert streamed == detok.text
