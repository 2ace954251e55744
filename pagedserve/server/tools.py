"""OpenAI tool calling for chat completions: ``tools`` and ``tool_choice``.

* ``"required"`` and a named function are enforced by a grammar built from the tools' JSON
  schemas (vLLM's shapes): a named function's output is its arguments object; ``required``'s is a
  JSON array of ``{"name": ..., "parameters": {...}}``, one of the tools each.
* ``"auto"`` lets the model write what it wants; the tool-call parser chosen with
  ``--tool-call-parser`` (a ``register_tool_parsers`` plugin) finds the calls in the text.
* ``"none"`` is plain text.

Calls come back as OpenAI's ``message.tool_calls`` with ``finish_reason: "tool_calls"`` (a named
function: ``"stop"``, as OpenAI and vLLM answer it); streams send ``delta.tool_calls``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pagedserve.core.plugins import PluginManager
from pagedserve.core.sampling_params import StructuredOutputsParams
from pagedserve.plugins.structured.tool_parsers import ExtractedToolCalls, ParsedToolCall, ToolParser
from pagedserve.server.errors import APIError
from pagedserve.server.protocol import (
    ChatCompletionTool,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    ToolChoice,
    new_tool_call_id,
)


@dataclass
class ToolOptions:
    """The server's flags: ``--enable-auto-tool-choice`` and ``--tool-call-parser``."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None


def check_tool_options(options: ToolOptions, plugins: PluginManager) -> None:
    """ValueError unless the flags go together and name a registered parser."""
    if options.enable_auto_tool_choice and options.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME")
    if options.tool_call_parser is not None:
        if not options.enable_auto_tool_choice:
            raise ValueError("--tool-call-parser is used with --enable-auto-tool-choice; give both")
        registry = plugins.registry("tool_parsers")
        if options.tool_call_parser not in registry:
            known = ", ".join(registry.names()) or "none"
            raise ValueError(f"unknown --tool-call-parser {options.tool_call_parser!r}; known: {known}")


def load_tool_parser(options: ToolOptions, plugins: PluginManager, tokenizer: Any) -> ToolParser | None:
    """The parser for ``tool_choice="auto"``, or None when auto tool choice is off."""
    check_tool_options(options, plugins)
    if not options.enable_auto_tool_choice:
        return None
    return plugins.registry("tool_parsers").load(options.tool_call_parser)(tokenizer)


# -- the request ---------------------------------------------------------------------------------


def resolve_tool_choice(tools: list[ChatCompletionTool] | None, choice: ToolChoice | None) -> ToolChoice:
    """OpenAI's default (``auto`` with tools, ``none`` without); 400 for a choice without tools
    or a function that is not among them."""
    if choice is None:
        return "auto" if tools else "none"
    if not tools:
        if choice == "none":
            return choice
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        known = ", ".join(t.function.name for t in tools)
        raise APIError(
            400, f"tool_choice names the function {choice.function.name!r}, not among the tools ({known})",
            param="tool_choice",
        )
    return choice


def effective_tool_choice(
    tools: list[ChatCompletionTool] | None, given: ToolChoice | None, parser: ToolParser | None
) -> ToolChoice:
    """The tool choice a request gets: as ``resolve_tool_choice``, and ``auto`` without a
    parser is plain text when the client did not ask for it (as vLLM), a 400 when it did."""
    choice = resolve_tool_choice(tools, given)
    if choice == "auto" and tools and parser is None:
        if given is None:
            return "none"
        raise APIError(
            400,
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
            param="tool_choice",
        )
    return choice


def _parameters(tool: ChatCompletionTool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_grammar(
    tools: list[ChatCompletionTool], choice: ToolChoice, parallel_tool_calls: bool
) -> StructuredOutputsParams | None:
    """The JSON schema that enforces ``required`` or a named function; None for auto / none."""
    if isinstance(choice, NamedToolChoice):
        (tool,) = [t for t in tools if t.function.name == choice.function.name]
        return StructuredOutputsParams(json=_parameters(tool))
    if choice != "required":
        return None
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t)},
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
    }
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": one_call}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template: an assistant's tool-call arguments as objects, as the
    templates of tool-calling models (and vLLM) expect them."""
    result = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            fixed = []
            for call in calls:
                function = dict(call.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        pass  # not JSON: the template gets the text
                fixed.append({**call, "function": function})
            message = {**message, "tool_calls": fixed}
        result.append(message)
    return result


# -- the output ----------------------------------------------------------------------------------


def extract_tool_calls(text: str, choice: ToolChoice, parser: ToolParser | None) -> ExtractedToolCalls:
    """The content and the calls of a whole output, for the given tool choice: what its stream
    would send, at once (so streamed calls always reassemble to these)."""
    stream = ToolCallStream(choice, parser)
    content, _ = stream.feed(text, finished=True)
    return ExtractedToolCalls(content, stream.calls)


def finish_reason(reason: str | None, choice: ToolChoice, extracted: ExtractedToolCalls) -> str | None:
    """``tool_calls`` when the output stopped on its own with calls in it (a named function:
    ``stop``, as OpenAI answers)."""
    if reason == "stop" and extracted.calls and not isinstance(choice, NamedToolChoice):
        return "tool_calls"
    return reason


def tool_calls(extracted: ExtractedToolCalls) -> list[ToolCall] | None:
    if not extracted.calls:
        return None
    return [ToolCall(function=FunctionCall(name=c.name, arguments=c.arguments)) for c in extracted.calls]


@dataclass
class ToolCallStream:
    """One choice's streamed output under a tool choice: what to send for each new piece of
    text. A named function streams its arguments as they come; ``required`` sends each call
    once its array element is complete; ``auto`` streams the content the parser is sure of and
    the calls when the output ends."""

    choice: ToolChoice
    parser: ToolParser | None
    text: str = ""
    content_sent: int = 0
    calls_sent: int = 0
    _decoded_until: int = 0
    _array_started: bool = False
    calls: list[ParsedToolCall] = field(default_factory=list)

    def feed(self, delta: str, finished: bool) -> tuple[str | None, list[DeltaToolCall]]:
        """(content to send, tool-call deltas to send) after ``delta``."""
        self.text += delta
        if isinstance(self.choice, NamedToolChoice):
            return None, self._named(delta)
        if self.choice == "required":
            return self._required(finished)
        if self.choice == "auto" and self.parser is not None:
            return self._auto(finished)
        return delta or None, []

    def _named(self, delta: str) -> list[DeltaToolCall]:
        pieces = []
        if self.calls_sent == 0:
            self.calls_sent = 1
            self.calls.append(ParsedToolCall(self.choice.function.name, ""))
            pieces.append(
                DeltaToolCall(index=0, id=new_tool_call_id(), type="function",
                              function=DeltaFunctionCall(name=self.choice.function.name, arguments=""))
            )
        if delta:
            self.calls[0].arguments += delta
            pieces.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta)))
        return pieces

    def _required(self, finished: bool) -> tuple[str | None, list[DeltaToolCall]]:
        decoder = json.JSONDecoder()
        found = []
        while True:
            position = self._decoded_until
            while position < len(self.text) and self.text[position] in " \t\r\n,[":
                self._array_started = self._array_started or self.text[position] == "["
                position += 1
            if not self._array_started or position >= len(self.text) or self.text[position] != "{":
                break
            try:
                item, end = decoder.raw_decode(self.text, position)
            except json.JSONDecodeError:
                break
            self._decoded_until = end
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                found.append(ParsedToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False)))
        if finished and not self.calls and not found:  # cut short before any call: the text
            return self.text or None, []
        return None, self._send(found)

    def _auto(self, finished: bool) -> tuple[str | None, list[DeltaToolCall]]:
        if not finished:
            safe = self.parser.content_length(self.text)
            content = self.text[self.content_sent : safe]
            self.content_sent = max(self.content_sent, safe)
            return content or None, []
        extracted = self.parser.extract(self.text)
        content = (extracted.content or "")[self.content_sent :] if extracted.calls else self.text[self.content_sent :]
        self.content_sent = len(self.text)
        return content or None, self._send(extracted.calls)

    def _send(self, calls: list[ParsedToolCall]) -> list[DeltaToolCall]:
        pieces = []
        for call in calls:
            pieces.append(
                DeltaToolCall(
                    index=self.calls_sent, id=new_tool_call_id(), type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=call.arguments),
                )
            )
            self.calls.append(call)
            self.calls_sent += 1
        return pieces
