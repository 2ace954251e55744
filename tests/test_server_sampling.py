"""vLLM's sampling extras through a real server: prompt_logprobs, best_of, allowed_token_ids,
bad_words, truncate_prompt_tokens; each invalid value a 400 naming its field."""

from __future__ import annotations

import httpx2
import openai
import pytest
from server_process import API_KEY, Server

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "def fibonacci(n):"


def post(server: Server, route: str, body: dict) -> httpx2.Response:
    return httpx2.post(f"{server.url}/v1/{route}", headers=AUTH, json=body, timeout=60)


INVALID = [
    ("bad_words", {"bad_words": [""]}),
    ("allowed_token_ids", {"allowed_token_ids": []}),
    ("allowed_token_ids", {"allowed_token_ids": [10**6]}),
    ("truncate_prompt_tokens", {"truncate_prompt_tokens": 0}),
    ("best_of", {"n": 3, "best_of": 2}),
    ("best_of", {"n": 1, "best_of": 2, "stream": True}),
    ("prompt_logprobs", {"prompt_logprobs": 1, "stream": True}),
    ("prompt_logprobs", {"prompt_logprobs": 21}),
]


@pytest.mark.parametrize(("field", "extra"), INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_invalid_extras_are_400_naming_the_field(server: Server, field: str, extra: dict) -> None:
    response = post(server, "completions", {"prompt": PROMPT, "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_prompt_logprobs_extra_in_completions_and_chat(server: Server) -> None:
    body = post(server, "completions", {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 2}).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == body["usage"]["prompt_tokens"] and entries[0] is None
    for entry in entries[1:]:
        assert 1 <= len(entry) <= 3  # the prompt token and the top 2
        assert all(e["logprob"] <= 0 and e["rank"] >= 1 and isinstance(e["decoded_token"], str) for e in entry.values())
    chat = post(server, "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_best_of_returns_n_choices(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=None, prompt=PROMPT, n=2, best_of=4, max_tokens=5, temperature=1.0, seed=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.completion_tokens == 10


def test_token_filters_and_truncation(server: Server, client: openai.OpenAI) -> None:
    allowed = [40, 41]
    texts = {httpx2.post(f"{server.url}/detokenize", json={"tokens": [t]}).json()["prompt"] for t in allowed}
    out = client.completions.create(
        model=None, prompt=PROMPT, max_tokens=6, temperature=1.0, logprobs=0,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True},
    )
    tokens = out.choices[0].logprobs.tokens
    assert len(tokens) == 6 and set(tokens) <= texts
    plain = client.completions.create(model=None, prompt=PROMPT, max_tokens=6, temperature=0.0, logprobs=0, extra_body={"ignore_eos": True})
    first = plain.choices[0].logprobs.tokens[0]
    banned = client.completions.create(
        model=None, prompt=PROMPT, max_tokens=6, temperature=0.0, logprobs=0,
        extra_body={"ignore_eos": True, "bad_words": [first]},
    )
    assert banned.choices[0].logprobs.tokens[0] != first or not first.strip()
    truncated = client.completions.create(
        model=None, prompt=PROMPT * 4, max_tokens=2, extra_body={"truncate_prompt_tokens": 3}
    )
    assert truncated.usage.prompt_tokens == 3


def test_streamed_deltas_add_up_to_the_plain_response(client: openai.OpenAI) -> None:
    fields = {"model": None, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0, "n": 2, "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**fields)
    texts = {0: "", 1: ""}
    usage = None
    for chunk in client.completions.create(**fields, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert texts == {c.index: c.text for c in plain.choices}
    assert usage.completion_tokens == plain.usage.completion_tokens == 24


def offline_beams(model_dir, prompt_ids: list[int], params) -> list[str]:
    from pagedserve import LLM

    engine = LLM(str(model_dir), dtype="float32").engine
    engine.add_beam_search_request("b", {"prompt_token_ids": prompt_ids}, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return [c.text for c in outputs[-1].outputs]


def test_use_beam_search_gives_the_offline_beams(server: Server, client: openai.OpenAI, tiny_model) -> None:
    from pagedserve import BeamSearchParams

    prompt_ids = httpx2.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    extra = {"use_beam_search": True, "length_penalty": 0.5, "ignore_eos": True}
    completion = client.completions.create(model=None, prompt=PROMPT, n=3, max_tokens=6, temperature=0.0, extra_body=extra)
    expected = offline_beams(tiny_model(), prompt_ids, BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5, ignore_eos=True))
    assert [c.text for c in completion.choices] == expected
    assert [c.index for c in completion.choices] == [0, 1, 2] and completion.usage.completion_tokens == 18
    streamed = {}
    for chunk in client.completions.create(model=None, prompt=PROMPT, n=3, max_tokens=6, extra_body=extra, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == expected
    chat = client.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4, extra_body=extra
    )
    assert len(chat.choices) == 2 and all(c.finish_reason == "length" for c in chat.choices)
    refused = post(server, "completions", {"prompt": PROMPT, "use_beam_search": True, "logprobs": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    bad = post(server, "completions", {"prompt": PROMPT, "use_beam_search": True, "early_stopping": "maybe"})
    assert bad.status_code == 400 and "early_stopping" in bad.json()["error"]["message"]
