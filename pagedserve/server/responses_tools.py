"""Function tools on ``/v1/responses``: the Responses API's shapes on top of the chat route's
tool calling (``server/tools.py``: the grammar of ``required`` / a named function, the parser of
``auto``).

* ``tools`` ``{"type": "function", "name", "description", "parameters", "strict"}`` become chat
  tools; any other tool type (``web_search``, ``file_search``, ``mcp``, ...) is a 400 naming it.
* ``tool_choice`` ``"none"`` / ``"auto"`` / ``"required"`` / ``{"type": "function", "name"}``
  become the chat route's tool choices.
* ``function_call`` and ``function_call_output`` input items become the assistant ``tool_calls``
  and ``tool`` messages the chat template renders.
* The calls found in an output become ``function_call`` output items.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from pagedserve.plugins.structured.tool_parsers import ExtractedToolCalls
from pagedserve.server.errors import APIError
from pagedserve.server.protocol import (
    ChatCompletionTool,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    ToolCall,
    ToolChoice,
    new_tool_call_id,
)
from pagedserve.server.responses_protocol import FunctionCallItem, FunctionCallOutputItem, FunctionToolCall


def chat_tools(tools: list[dict[str, Any]] | None) -> list[ChatCompletionTool] | None:
    """The request's function tools as chat tools; 400 for another type or a bad function."""
    if not tools:
        return None
    converted = []
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise APIError(
                400, f"tools of type {kind!r} are not supported by /v1/responses; only function tools",
                param=f"tools[{index}].type",
            )
        fields = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        try:
            converted.append(ChatCompletionTool(function=FunctionDefinition(**fields)))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise APIError(400, f"tools[{index}]: {problems}", param=f"tools[{index}]") from None
    return converted


def chat_tool_choice(choice: Any) -> ToolChoice | None:
    """The Responses ``tool_choice`` as the chat route's; 400 for a form not served."""
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return NamedToolChoice(function=NamedFunction(name=choice["name"]))
    raise APIError(
        400,
        f"tool_choice {choice!r} is not supported; give \"none\", \"auto\", \"required\" or "
        '{"type": "function", "name": ...}',
        param="tool_choice",
    )


def call_message(item: FunctionCallItem, messages: list[ChatMessage]) -> None:
    """Append a ``function_call`` item as an assistant tool call, joining the calls of one turn
    (consecutive items) into one assistant message."""
    call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant" and last.tool_calls:
        last.tool_calls.append(call)
    else:
        messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))


def output_message(item: FunctionCallOutputItem) -> ChatMessage:
    """A ``function_call_output`` item as the ``tool`` message answering its call."""
    output = item.output
    if isinstance(output, list):
        output = "".join(part.text for part in output)
    return ChatMessage(role="tool", tool_call_id=item.call_id, content=output)


def new_function_call(name: str, arguments: str, call_id: str | None = None, status: str = "completed") -> FunctionToolCall:
    return FunctionToolCall(
        id=f"fc_{uuid.uuid4().hex}", call_id=call_id or new_tool_call_id(), name=name, arguments=arguments,
        status=status,
    )


def function_calls(extracted: ExtractedToolCalls, status: str) -> list[FunctionToolCall]:
    return [new_function_call(call.name, call.arguments, status=status) for call in extracted.calls]


def reply_message(text: str | None, calls: list[FunctionToolCall]) -> ChatMessage:
    """The assistant message an output was, for a later ``previous_response_id``."""
    tool_calls = [ToolCall(id=c.call_id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return ChatMessage(role="assistant", content=text if text or not tool_calls else None, tool_calls=tool_calls or None)
