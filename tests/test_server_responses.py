"""``/v1/responses`` through the openai SDK (``responses.create`` and ``responses.stream``, sync
and async) on the shared test server, compared with the offline ``LLM.chat`` of the same
conversation; the store, ``store: false`` and ``previous_response_id``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field
from server_process import API_KEY, ENGINE_ARGS

from pagedserve import LLM, SamplingParams
from pagedserve.server.responses import ResponseStore, StoredResponse
from pagedserve.server.responses_protocol import ResponseObject

pytestmark = pytest.mark.slow

SYSTEM = "You write Python."
GREEDY = {"temperature": 0.0, "max_output_tokens": 12}


class TimeArgs(BaseModel):
    zone: Literal["UTC", "CET", "PST"]


class WeatherArgs(BaseModel):
    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


def function_tool(name: str, arguments: type[BaseModel]) -> dict:
    return {"type": "function", "name": name, "description": f"{name}.", "parameters": arguments.model_json_schema(),
            "strict": False}


TIME_TOOL = function_tool("get_time", TimeArgs)
TOOLS = [function_tool("get_weather", WeatherArgs), TIME_TOOL]
ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}
TOOL_GREEDY = {"temperature": 0.0, "max_output_tokens": 200, "tools": TOOLS, "parallel_tool_calls": False}


def calls_of(response) -> list:
    return [item for item in response.output if item.type == "function_call"]


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model()


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), **ENGINE_ARGS)


def offline(llm: LLM, messages: list[dict]) -> tuple[str, int, int, str]:
    """Text, prompt and output token counts and finish reason of the offline greedy chat."""
    (output,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    completion = output.outputs[0]
    return completion.text, len(output.prompt_token_ids), len(completion.token_ids), completion.finish_reason


def test_create_equals_offline_chat_and_is_stored(client, llm, model_dir) -> None:
    response = client.responses.create(model=str(model_dir), input="Sort a list.", instructions=SYSTEM, **GREEDY)
    text, prompt_tokens, output_tokens, finish = offline(
        llm, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Sort a list."}]
    )
    assert response.output_text == text and response.object == "response"
    assert response.id.startswith("resp_") and response.output[0].role == "assistant"
    assert response.usage.input_tokens == prompt_tokens and response.usage.output_tokens == output_tokens
    assert response.usage.total_tokens == prompt_tokens + output_tokens
    assert response.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert response.incomplete_details.reason == "max_output_tokens"
    stored = client.responses.retrieve(response.id)
    assert stored.output_text == text and stored.usage == response.usage and stored.instructions == SYSTEM


def test_message_items_and_previous_response_id_continue_the_conversation(client, llm) -> None:
    first = client.responses.create(
        input=[
            {"role": "developer", "content": SYSTEM},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Sort a list."}]},
        ],
        **GREEDY,
    )
    second = client.responses.create(input="Now reverse it.", previous_response_id=first.id, **GREEDY)
    conversation = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Sort a list."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Now reverse it."},
    ]
    assert first.output_text == offline(llm, conversation[:2])[0]
    assert second.output_text == offline(llm, conversation)[0]
    assert second.previous_response_id == first.id


def test_store_false_keeps_nothing(client) -> None:
    response = client.responses.create(input="Sort a list.", store=False, **GREEDY)
    assert response.store is False
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError, match="Previous response"):
        client.responses.create(input="more", previous_response_id=response.id, **GREEDY)


EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def check_events(events: list, final, whole: str) -> None:
    kinds = [event.type for event in events]
    assert [kind for kind in kinds if kind != "response.output_text.delta"] == EVENTS
    assert kinds.count("response.output_text.delta") >= 1
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole == final.output_text
    assert final.usage.output_tokens >= 1 and events[-1].response.id == final.id


def test_sync_stream_equals_the_whole_response(client, model_dir) -> None:
    whole = client.responses.create(input="Sort a list.", instructions=SYSTEM, **GREEDY).output_text
    with client.responses.stream(model=str(model_dir), input="Sort a list.", instructions=SYSTEM, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_events(events, final, whole)
    raw = list(client.responses.create(input="Sort a list.", instructions=SYSTEM, stream=True, **GREEDY))
    check_events(raw, raw[-1].response, whole)
    assert client.responses.retrieve(final.id).output_text == whole


def test_async_create_and_stream(server, model_dir) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        whole = (await client.responses.create(input="Sort a list.", **GREEDY)).output_text
        async with client.responses.stream(model=str(model_dir), input="Sort a list.", **GREEDY) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        check_events(events, final, whole)
        raw = [event async for event in await client.responses.create(input="Sort a list.", stream=True, **GREEDY)]
        check_events(raw, raw[-1].response, whole)
        await client.close()

    asyncio.run(run())


class Answer(BaseModel):
    kind: Literal["yes", "no"]
    ok: bool


def test_text_format_json_schema_constrains_the_output(client, model_dir) -> None:
    parsed = client.responses.parse(
        model=str(model_dir), input="Answer in JSON.", text_format=Answer, temperature=0.0, max_output_tokens=64
    )
    assert isinstance(parsed.output_parsed, Answer)
    assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "Answer"
    stored = client.responses.retrieve(parsed.id)
    assert Answer.model_validate_json(stored.output_text) == parsed.output_parsed
    with client.responses.stream(
        model=str(model_dir), input="Answer.", text_format=Answer, temperature=0.9, extra_body={"seed": 3}, max_output_tokens=64
    ) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Answer)
    anything = client.responses.create(input="JSON.", text={"format": {"type": "json_object"}}, **GREEDY | {"max_output_tokens": 64})
    # A random model may not close its object's key in 64 tokens, but it opens an object.
    assert anything.output_text.startswith("{")
    if anything.status == "completed":
        assert isinstance(json.loads(anything.output_text), dict)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "'web_search' are not supported"),
        ({"tools": [TIME_TOOL, {"type": "mcp", "server_label": "x"}]}, "tools[1].type", "'mcp' are not supported"),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0]", "tools\\[0\\]"),
        ({"tools": [TIME_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not among"),
        ({"tools": [TIME_TOOL], "tool_choice": {"type": "web_search"}}, "tool_choice", "not supported"),
        ({"tools": [TIME_TOOL], "tool_choice": "auto"}, "tool_choice", "--enable-auto-tool-choice"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [TIME_TOOL], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
            "text.format",
            "cannot be combined",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
            "text.format",
            "text.format",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "needs a schema"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", "only text"),
        ({"input": []}, "input", "input is empty"),
    ],
    ids=["web_search", "mcp", "bad function", "unknown function", "builtin choice", "auto without parser",
         "required without tools", "format and tools", "bad schema", "no schema", "image", "empty"],
)
def test_what_is_not_supported_is_a_clear_400(client, fields, param, words) -> None:
    with pytest.raises(openai.BadRequestError, match=words) as caught:
        client.responses.create(**{"input": "x", **GREEDY, **fields})
    assert caught.value.body["param"] == param


def test_tool_choice_required_gives_arguments_valid_against_the_schema(client) -> None:
    response = client.responses.create(
        input="What should I do?", tools=TOOLS, tool_choice="required", temperature=1.0, max_output_tokens=200,
        extra_body={"seed": 5},
    )
    (call,) = calls_of(response)
    assert response.status == "completed" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    ARGS[call.name].model_validate_json(call.arguments)
    assert response.tool_choice == "required" and [t.name for t in response.tools] == ["get_weather", "get_time"]
    stored = client.responses.retrieve(response.id)
    assert calls_of(stored)[0].arguments == call.arguments


def test_a_named_function_is_called(client) -> None:
    response = client.responses.create(
        input="Time?", tool_choice={"type": "function", "name": "get_time"}, **TOOL_GREEDY
    )
    (call,) = calls_of(response)
    assert call.name == "get_time" and response.output_text == ""
    TimeArgs.model_validate_json(call.arguments)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}], ids=["required", "named"])
def test_streamed_function_calls_reassemble_to_the_non_streamed_ones(client, model_dir, tool_choice) -> None:
    whole = calls_of(client.responses.create(input="Weather?", tool_choice=tool_choice, **TOOL_GREEDY))
    with client.responses.stream(model=str(model_dir), input="Weather?", tool_choice=tool_choice, **TOOL_GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert [k for k in kinds if k != "response.function_call_arguments.delta"] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    (streamed,) = calls_of(final)
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    (added,) = [e for e in events if e.type == "response.output_item.added"]
    assert [(c.name, c.arguments) for c in whole] == [(streamed.name, streamed.arguments)]
    assert deltas == done.arguments == streamed.arguments and done.item_id == streamed.id == added.item.id
    assert added.item.call_id == streamed.call_id and added.item.name == streamed.name
    ARGS[streamed.name].model_validate_json(streamed.arguments)


def test_function_call_output_continues_the_conversation(client) -> None:
    """The call and its output, as items or through previous_response_id, render as the chat
    route's assistant tool_calls and tool messages: the same greedy text as that chat."""
    first = client.responses.create(input="Weather in Oslo?", tool_choice="required", **TOOL_GREEDY)
    (call,) = calls_of(first)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"forecast": "snow"}'}
    as_items = client.responses.create(
        input=[{"role": "user", "content": "Weather in Oslo?"}, *first.output, result], **TOOL_GREEDY
    )
    chained = client.responses.create(input=[result], previous_response_id=first.id, **TOOL_GREEDY)
    chat = client.chat.completions.create(
        model=first.model, temperature=0.0, max_tokens=200, tools=[{"type": "function", "function": {
            k: v for k, v in tool.items() if k != "type"}} for tool in TOOLS],
        tool_choice="none",
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ]},
            {"role": "tool", "tool_call_id": call.call_id, "content": '{"forecast": "snow"}'},
        ],
    )
    assert as_items.output_text == chained.output_text == chat.choices[0].message.content
    assert not calls_of(as_items) and as_items.usage.input_tokens == chat.usage.prompt_tokens


def test_the_store_is_bounded() -> None:
    store = ResponseStore(capacity=2)
    for name in ("a", "b", "c"):
        store.put(StoredResponse(ResponseObject(id=name, status="completed", model="m"), []))
    assert len(store) == 2 and store.get("a") is None and store.get("c") is not None
