"""Structured output and tool calling as clients see them: a real ``pagedserve serve`` of the
bundled model (with ``--enable-auto-tool-choice --tool-call-parser hermes``) driven with the
official ``openai`` SDK. Every output is validated against what constrained it."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field
from server_process import API_KEY, Server, free_port, start_server

from pagedserve.assets import DEFAULT_MODEL

pytestmark = pytest.mark.slow


class Pet(BaseModel):
    name: str = Field(max_length=10)
    species: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool
    toys: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)


class WeatherArgs(BaseModel):
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]


class TimeArgs(BaseModel):
    zone: Literal["UTC", "CET", "PST"]


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast.",
                                      "parameters": WeatherArgs.model_json_schema()}},
    {"type": "function", "function": {"name": "get_time", "parameters": TimeArgs.model_json_schema()}},
]
ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}
HERMES_CALLS = (
    r'Let me look\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}", '
    r'"days": [1-7], "unit": "celsius"\}\}</tool_call>\n'
    r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}</tool_call>'
)
PROMPTS = [
    "Describe a pet.", "A pet as JSON.", "Tell me about your dog.", "Who is the cat?", "Fish facts.",
    "Name a pet.", "My neighbour's pet.", "A very old dog.", "A young cat.", "Any animal.",
    "def pet():", "import pets", "class Pet:", "# pet record", "Write JSON.", "Another pet.",
    "The shop's fish.", "A pet for a child.", "A famous pet.", "Last pet.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    command = [sys.executable, "-m", "pagedserve", "serve", DEFAULT_MODEL]
    log = tmp_path_factory.mktemp("structured-server") / "server.log"
    server = start_server(
        command, log, free_port(), "--api-key", API_KEY, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_parse_with_a_pydantic_model_for_20_prompts(server: Server) -> None:
    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        calls = [
            client.chat.completions.parse(
                model=DEFAULT_MODEL, messages=chat(prompt), response_format=Pet, max_tokens=120, seed=i
            )
            for i, prompt in enumerate(PROMPTS)
        ]
        return await asyncio.gather(*calls)

    completions = asyncio.run(run())
    assert len(completions) == 20
    parsed = [c.choices[0].message.parsed for c in completions]
    assert all(isinstance(p, Pet) for p in parsed)
    assert len({p.model_dump_json() for p in parsed}) > 1


def test_json_object_always_parses(client: openai.OpenAI) -> None:
    """Every output that ends on its own is a JSON object; any JSON object is unbounded, so an
    output may also be cut at max_tokens (then it is exactly max_tokens long)."""
    parsed = 0
    for prompt in ("Any JSON.", "Return an object.", "A config"):
        response = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=chat(prompt), response_format={"type": "json_object"},
            n=3, temperature=0.7, seed=5, max_tokens=200,
        )
        for choice in response.choices:
            assert choice.message.content.startswith("{")
            if choice.finish_reason == "stop":
                assert isinstance(json.loads(choice.message.content), dict)
                parsed += 1
            else:
                assert choice.finish_reason == "length"
        assert response.usage.completion_tokens <= 3 * 200
    assert parsed >= 5


def test_regex_and_choice_always_match_in_both_apis(client: openai.OpenAI) -> None:
    regex = r"[A-Z][a-z]{2,6}-[0-9]{2}"
    choices = ["yes", "no", "not sure"]
    chat_regex = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=chat("Code?"), n=3, temperature=1.0, seed=1, max_tokens=20,
        extra_body={"structured_outputs": {"regex": regex}},
    )
    completion_regex = client.completions.create(
        model=DEFAULT_MODEL, prompt="code = ", n=3, temperature=1.0, seed=2, max_tokens=20,
        extra_body={"guided_regex": regex},
    )
    texts = [c.message.content for c in chat_regex.choices] + [c.text for c in completion_regex.choices]
    assert all(re.fullmatch(regex, t) for t in texts), texts
    chat_choice = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=chat("Well?"), n=4, temperature=1.5, seed=3, max_tokens=10,
        extra_body={"guided_choice": choices},
    )
    completion_choice = client.completions.create(
        model=DEFAULT_MODEL, prompt="answer:", n=4, temperature=1.5, seed=4, max_tokens=10,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    picked = [c.message.content for c in chat_choice.choices] + [c.text for c in completion_choice.choices]
    assert set(picked) <= set(choices)


def test_completions_take_response_format_json_schema(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=DEFAULT_MODEL, prompt="pet = ", max_tokens=120, temperature=0.7, seed=9,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}}},
    )
    Pet.model_validate_json(response.choices[0].text)


def test_seeds_stop_strings_and_max_tokens_compose_with_a_schema(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema(), "strict": True}}
    common = {"model": DEFAULT_MODEL, "messages": chat("A pet."), "response_format": fmt, "max_tokens": 120}
    first = client.chat.completions.create(**common, temperature=1.0, seed=42)
    again = client.chat.completions.create(**common, temperature=1.0, seed=42)
    assert first.choices[0].message.content == again.choices[0].message.content
    full = first.choices[0].message.content
    cut = client.chat.completions.create(**{**common, "max_tokens": 6}, temperature=1.0, seed=42)
    assert cut.choices[0].finish_reason == "length"
    assert full.startswith(cut.choices[0].message.content) and cut.choices[0].message.content
    stopped = client.chat.completions.create(**common, temperature=1.0, seed=42, stop=['"age"'])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full.split('"age"')[0]


def test_tool_choice_required_gives_arguments_valid_against_the_schema(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=chat("What should I do?"), tools=TOOLS, tool_choice="required",
        n=4, temperature=1.0, seed=8, max_tokens=150, parallel_tool_calls=False,
    )
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            ARGS[call.function.name].model_validate_json(call.function.arguments)


def test_a_named_function_is_called(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=chat("Time?"), tools=TOOLS, max_tokens=60, temperature=0.0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    TimeArgs.model_validate_json(call.function.arguments)


def _reassemble(stream) -> tuple[dict[int, dict], str | None, str]:
    """Tool calls by index (id, name, arguments joined), the finish reason and the content."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    return calls, finish, content


@pytest.mark.parametrize(
    ("tool_choice", "extra"),
    [
        ("required", {}),
        ({"type": "function", "function": {"name": "get_weather"}}, {}),
        ("auto", {"structured_outputs": {"regex": HERMES_CALLS}}),
    ],
    ids=["required", "named", "auto-hermes"],
)
def test_streamed_tool_calls_reassemble_to_the_non_streamed_ones(client: openai.OpenAI, tool_choice, extra) -> None:
    common = {"model": DEFAULT_MODEL, "messages": chat("Weather in Paris?"), "tools": TOOLS,
              "tool_choice": tool_choice, "temperature": 0.0, "max_tokens": 300, "extra_body": extra,
              "parallel_tool_calls": False}
    whole = client.chat.completions.create(**common).choices[0]
    calls, finish, content = _reassemble(client.chat.completions.create(**common, stream=True))
    assert whole.message.tool_calls
    assert finish == whole.finish_reason == ("stop" if isinstance(tool_choice, dict) else "tool_calls")
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert all(c["id"] for c in calls.values())
    assert content == (whole.message.content or "")
    if tool_choice == "auto":
        assert content == "Let me look. " and len(calls) == 2
    for call in whole.message.tool_calls:
        ARGS[call.function.name].model_validate_json(call.function.arguments)


def test_auto_without_a_call_is_plain_content(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=chat("Hello"), tools=TOOLS, max_tokens=12, temperature=0.0,
        extra_body={"structured_outputs": {"regex": "Hi there[.!]"}},
    )
    choice = response.choices[0]
    assert choice.message.tool_calls is None or choice.message.tool_calls == []
    assert re.fullmatch("Hi there[.!]", choice.message.content)
    assert choice.finish_reason == "stop"


def test_tool_and_assistant_tool_call_messages_render(client: openai.OpenAI) -> None:
    """A conversation with an earlier call and its result, through a template that knows no
    tools (the bundled model's): it renders, and a required call still comes back valid."""
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "oslo", "days": 1, "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "snow"}'},
        {"role": "user", "content": "And the time?"},
    ]
    response = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, tools=TOOLS, max_tokens=60, temperature=0.0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    TimeArgs.model_validate_json(response.choices[0].message.tool_calls[0].function.arguments)


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "integer", "minimum": 5, "maximum": 2}}}},
         "response_format", "invalid JSON schema: Invalid range"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strng"}}}},
         "response_format", 'Unsupported type "strng"'),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "nothing"}}},
         "response_format", "needs json_schema.schema"),
        ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex", "invalid regex"),
        ({"extra_body": {"structured_outputs": {"grammar": "root ::= nope"}}}, "structured_outputs", "not defined"),
        ({"extra_body": {"structured_outputs": {"jsn": {}}}}, "structured_outputs", "unexpected keyword"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice", "give one way"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format", "cannot be combined"),
        ({"extra_body": {"guided_decoding_backend": "outlines", "guided_regex": "a"}},
         "guided_decoding_backend", "not available"),
    ],
)
def test_bad_constraints_are_400s_that_name_them(client: openai.OpenAI, kwargs, param, message) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=chat("x"), max_tokens=5, **kwargs)
    error = info.value.body
    assert error["param"] == param and message in error["message"], error
    # The server keeps serving.
    assert client.chat.completions.create(model=DEFAULT_MODEL, messages=chat("x"), max_tokens=2).choices
