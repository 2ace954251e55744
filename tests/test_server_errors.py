"""Every failure a client can cause gets its status and OpenAI's error body from a real server,
never a 500 or a stack trace; the API key guards ``/v1``."""

from __future__ import annotations

import httpx2
import openai
import pytest
from server_process import API_KEY, MAX_MODEL_LEN

pytestmark = pytest.mark.slow

KEY = API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = "hello " * (MAX_MODEL_LEN + 1)  # a token or more per word: too long for the model


def assert_error(response: httpx2.Response, status: int, message: str) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert message in error["message"]
    return error


COMPLETION_ERRORS = [
    ("malformed JSON", b'{"prompt": "x",', 400, "not valid JSON"),
    ("not an object", [1, 2], 400, "valid dictionary"),
    ("wrong type", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("NaN", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("negative temperature", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "empty"),
    ("empty list", {"prompt": []}, 400, "empty"),
    ("unknown model", {"prompt": "x", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist."),
    (
        "prompt too long",
        {"prompt": LONG},
        400,
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request has",
    ),
    ("too long and streamed", {"prompt": LONG, "stream": True}, 400, "maximum context length"),
    (
        "max_tokens too large",
        {"prompt": "x", "max_tokens": MAX_MODEL_LEN},
        400,
        f"'max_tokens' or 'max_completion_tokens' is too large: {MAX_MODEL_LEN}",
    ),
    ("huge max_tokens", {"prompt": "x", "max_tokens": 10**30}, 400, "too large"),
    ("zero max_tokens", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("huge n", {"prompt": "x", "n": 10**12}, 400, "max_num_seqs"),
    ("huge logprobs", {"prompt": "x", "logprobs": 10**9}, 400, "logprobs"),
    ("huge logit bias", {"prompt": "x", "logit_bias": {"5": 1e308}}, 400, "logit_bias"),
    ("logit bias key", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("bias outside vocab", {"prompt": "x", "logit_bias": {str(10**30): 1}}, 400, "vocabulary"),
    ("stop id outside vocab", {"prompt": "x", "stop_token_ids": [10**30]}, 400, "vocabulary"),
    ("token outside vocab", {"prompt": [[1, 2, 10**30]]}, 400, "vocabulary"),
    ("negative token", {"prompt": [1, -2]}, 400, "prompt"),
    ("min above max", {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),
    ("empty stop", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("suffix", {"prompt": "x", "suffix": "y"}, 400, "suffix is not supported"),
    ("best_of below n", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of must be at least n"),
    ("stream_options alone", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream"),
    # strict: no coercion, no infinities, no absurd temperature, no empty prompt in a list
    ("n as a string", {"prompt": "x", "n": "2"}, 400, "n: Input should be a valid integer"),
    ("max_tokens as a float", {"prompt": "x", "max_tokens": 2.0}, 400, "max_tokens"),
    ("stream as 1", {"prompt": "x", "stream": 1}, 400, "stream: Input should be a valid boolean"),
    ("Infinity", b'{"prompt": "x", "temperature": Infinity}', 400, "temperature: Input should be a finite"),
    ("absurd temperature", {"prompt": "x", "temperature": 1e308}, 400, "temperature"),
    ("infinite penalty", b'{"prompt": "x", "presence_penalty": -Infinity}', 400, "presence_penalty"),
    ("an empty prompt of a list", {"prompt": ["x", ""]}, 400, "empty"),
    ("empty token ids of a list", {"prompt": [[1], []]}, 400, "empty"),
    # one request may not take every seat: n x prompts under the per-request cap (half of 64)
    ("n over the per-request cap", {"prompt": "x", "n": 33}, 400, "--max-num-seqs-per-request"),
    ("n x prompts over the cap", {"prompt": ["x", "y"], "n": 17}, 400, "34 sequences (n=17 x 2 prompts)"),
]


@pytest.mark.parametrize(
    ("body", "status", "message"), [c[1:] for c in COMPLETION_ERRORS], ids=[c[0] for c in COMPLETION_ERRORS]
)
def test_completion_errors(server, body, status, message) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx2.post(f"{server.url}/v1/completions", headers=headers, timeout=30, **kwargs)
    assert_error(response, status, message)


CHAT_ERRORS = [
    ("no messages", {"messages": []}, 400, "messages"),
    ("bad role type", {"messages": [{"role": 3, "content": "x"}]}, 400, "role"),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "'image_url' is not supported",
    ),
    ("json_schema without a schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     400, "needs json_schema.schema"),
    ("unknown response_format", {"response_format": {"type": "yaml"}}, 400, "response_format"),
    ("auto tools without a parser", {"tools": [{"type": "function", "function": {"name": "f"}}],
                                     "tool_choice": "auto"}, 400, "--enable-auto-tool-choice"),
    ("top_logprobs alone", {"top_logprobs": 2}, 400, "logprobs"),
    ("too many top_logprobs", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("too long", {"messages": [{"role": "user", "content": LONG}]}, 400, "maximum context length"),
    ("max_completion_tokens", {"max_completion_tokens": 10**6}, 400, "too large"),
    ("unknown model", {"model": "other"}, 404, "does not exist"),
    ("unknown role", {"messages": [{"role": "hacker", "content": "x"}]}, 400, "role 'hacker' is not one of"),
    ("tool without its call id", {"messages": [{"role": "tool", "content": "4"}]}, 400, "needs tool_call_id"),
    ("user without content", {"messages": [{"role": "user"}]}, 400, "a user message needs content"),
    ("assistant with nothing", {"messages": [{"role": "assistant"}]}, 400, "needs content or tool_calls"),
    ("content as a number", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("n as a string", {"n": "2"}, 400, "n: Input should be a valid integer"),
    ("logprobs as a string", {"logprobs": "true"}, 400, "logprobs"),
    ("tokenize in kwargs", {"chat_template_kwargs": {"tokenize": True}}, 400, "cannot set tokenize"),
    (
        "server arguments in kwargs",
        {"chat_template_kwargs": {"add_generation_prompt": False, "conversation": [], "messages": []}},
        400,
        "cannot set add_generation_prompt, conversation, messages",
    ),
    ("a template in kwargs", {"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, 400, "chat_template"),
    ("a request's template", {"chat_template": "{{ 1 }}"}, 400, "--trust-request-chat-template"),
]


@pytest.mark.parametrize(
    ("body", "status", "message"), [c[1:] for c in CHAT_ERRORS], ids=[c[0] for c in CHAT_ERRORS]
)
def test_chat_errors(server, body, status, message) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    response = httpx2.post(f"{server.url}/v1/chat/completions", headers=AUTH, json=request, timeout=30)
    assert_error(response, status, message)


TOKENIZE_ERRORS = [
    ("tokenize in kwargs", {"chat_template_kwargs": {"tokenize": True}}, "cannot set tokenize"),
    ("conversation in kwargs", {"chat_template_kwargs": {"conversation": []}}, "cannot set conversation"),
    ("a request's template", {"chat_template": "{% for i in range(9) %}x{% endfor %}"}, "--trust-request"),
    ("unknown role", {"messages": [{"role": "hacker", "content": "x"}]}, "role 'hacker'"),
]


@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in TOKENIZE_ERRORS], ids=[c[0] for c in TOKENIZE_ERRORS]
)
def test_tokenize_errors(server, body, message) -> None:
    """``/tokenize`` needs no key and renders the chat template like the chat route."""
    request = {"messages": [{"role": "user", "content": "hi"}], **body}
    assert_error(httpx2.post(f"{server.url}/tokenize", json=request, timeout=30), 400, message)


def test_template_variables_still_reach_the_template(server) -> None:
    """Variables that are not rendering arguments are passed on, and the server still answers."""
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": True}}
    response = httpx2.post(f"{server.url}/tokenize", json=body, timeout=30)
    assert response.status_code == 200 and response.json()["count"] > 0


def test_other_routes_answer_errors_in_the_same_shape(server) -> None:
    assert_error(httpx2.get(f"{server.url}/v1/nothing", headers=AUTH), 404, "Not Found")
    assert_error(httpx2.get(f"{server.url}/v1/completions", headers=AUTH), 405, "Method Not Allowed")
    assert_error(
        httpx2.post(f"{server.url}/tokenize", json={"prompt": "x", "model": "x"}), 404, "does not exist"
    )
    assert_error(httpx2.post(f"{server.url}/detokenize", json={"tokens": [10**9]}), 400, "vocabulary")


def test_huge_values_that_are_valid_are_served(server) -> None:
    body = {"prompt": "x", "max_tokens": 2, "seed": 10**30, "top_k": 10**30, "temperature": 100.0}
    response = httpx2.post(f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
    ids=["none", "wrong", "not bearer"],
)
def test_the_api_key_guards_v1(server, headers) -> None:
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ):
        response = httpx2.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "x"})
        assert_error(response, 401, "Unauthorized")
    for path in ("/health", "/version", "/metrics"):  # open, as in vLLM
        assert httpx2.get(f"{server.url}{path}").status_code == 200


def test_the_openai_sdk_raises_its_own_errors(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    assert client.completions.create(model=model, prompt="x", max_tokens=1).usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=model, prompt=LONG)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
