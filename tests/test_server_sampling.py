"""vLLM's sampling extras through a real server: prompt_logprobs, best_of, allowed_token_ids,
bad_words, truncate_prompt_tokens; each invalid value a 400 naming its field."""

from __future__ import annotations

import httpx2
import openai
import pytest
from server_process import API_KEY, Server, shared_server

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Server:
    return shared_server(request.config, tiny_model(), tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)


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
