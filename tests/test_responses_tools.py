"""Function calls on ``/v1/responses`` without a server: ``auto`` with the hermes parser (the
shared responses test server has none), streamed piece by piece, gives the same items (a message
with the content, then the calls) as the whole output; items convert to chat messages."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from pagedserve.core.outputs import CompletionOutput, RequestOutput
from pagedserve.plugins.structured.tool_parsers import HermesToolParser
from pagedserve.server.errors import APIError
from pagedserve.server.responses import Draft, ResponseStore, _events
from pagedserve.server.responses_protocol import FunctionCallItem, FunctionCallOutputItem, ResponsesRequest
from pagedserve.server.responses_tools import call_message, chat_tools, output_message

WEATHER = {"name": "get_weather", "arguments": {"city": "oslo"}}
TIME = {"name": "get_time", "arguments": {"zone": "UTC"}}
TEXT = f"Let me look. <tool_call>{json.dumps(WEATHER)}</tool_call>\n<tool_call>{json.dumps(TIME)}</tool_call>"


def outputs(text: str, pieces: int) -> list[RequestOutput]:
    size = -(-len(text) // pieces)
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    return [
        RequestOutput(
            "r", None, [1, 2], [CompletionOutput(0, text, [3] * (i + 1), delta_text=chunk,
                                                 finish_reason="stop" if i == len(chunks) - 1 else None)],
            finished=i == len(chunks) - 1,
        )
        for i, chunk in enumerate(chunks)
    ]


def draft() -> Draft:
    state = SimpleNamespace(model_name="m", tool_parser=HermesToolParser(None))
    body = ResponsesRequest(input="x", tools=[{"type": "function", "name": "get_weather"}])
    return Draft(body, state, ResponseStore(), "resp_1", "msg_1", [], "auto")


async def _collect(events) -> list:
    return [event async for event in events]


async def _stream(items):
    for item in items:
        yield item


@pytest.mark.parametrize("pieces", [1, 5, 40])
def test_auto_stream_gives_the_items_of_the_whole_output(pieces: int) -> None:
    streamed = outputs(TEXT, pieces)
    whole = draft().finish(streamed[-1])
    events = asyncio.run(_collect(_events(draft(), _stream(streamed))))
    final = events[-1].response
    assert [item["type"] for item in final["output"]] == [item.type for item in whole.output] == [
        "message", "function_call", "function_call"
    ]
    assert whole.output[0].content[0].text == final["output"][0]["content"][0]["text"] == "Let me look. "
    for mine, theirs in zip(whole.output[1:], final["output"][1:], strict=True):
        assert (mine.name, json.loads(mine.arguments)) == (theirs["name"], json.loads(theirs["arguments"]))
    added = [e for e in events if e.type == "response.output_item.added"]
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.output_index for e in added] == [e.output_index for e in done] == [0, 1, 2]
    assert [e.item["id"] for e in done] == [item["id"] for item in final["output"]]
    arguments = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert arguments == [item["arguments"] for item in final["output"][1:]]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_items_become_chat_messages_and_other_tools_are_refused() -> None:
    messages: list = []
    for name in ("a", "b"):
        call_message(FunctionCallItem(type="function_call", call_id=f"call_{name}", name=name, arguments="{}"), messages)
    messages.append(output_message(FunctionCallOutputItem(type="function_call_output", call_id="call_a", output="1")))
    assert [m.role for m in messages] == ["assistant", "tool"]
    assert [c.id for c in messages[0].tool_calls] == ["call_a", "call_b"] and messages[1].tool_call_id == "call_a"
    assert chat_tools([{"type": "function", "name": "f", "strict": True}])[0].function.name == "f"
    with pytest.raises(APIError, match="'file_search' are not supported"):
        chat_tools([{"type": "file_search"}])
