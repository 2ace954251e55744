"""Tool-call parsers for ``tool_choice="auto"``: they find the tool calls a model wrote in its own
format in the output text. Registered through ``register_tool_parsers`` and chosen with
``pagedserve serve --enable-auto-tool-choice --tool-call-parser NAME``.

A parser needs two methods: ``extract`` (the whole output: its plain content and its calls) and
``content_length`` (for streaming: how much of the text so far is surely plain content, so it can
be sent before the output ends). The server streams the content as it comes and sends the calls
once the output ends.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedToolCall:
    """One call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    """The plain content of an output (None when there is none) and the tool calls in it."""

    content: str | None
    calls: list[ParsedToolCall] = field(default_factory=list)


def _call(obj: Any, arguments_keys: tuple[str, ...]) -> ParsedToolCall | None:
    """A call from ``{"name": ..., "<arguments key>": {...}}``; None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in arguments_keys:
        if key in obj:
            arguments = obj[key]
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            return ParsedToolCall(obj["name"], text)
    return ParsedToolCall(obj["name"], "{}")


class ToolParser(ABC):
    """Finds tool calls in a model's output. ``skip_special_tokens`` is what the output's
    detokenization needs (False where the call markers are special tokens)."""

    skip_special_tokens: bool = True

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def extract(self, text: str) -> ExtractedToolCalls:
        """The content and the calls of a whole output; text that is no valid call stays content."""

    @abstractmethod
    def content_length(self, text: str) -> int:
        """How many leading characters of an unfinished output are surely plain content."""


class HermesToolParser(ToolParser):
    """Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one
    block per call, after optional plain content."""

    START, END = "<tool_call>", "</tool_call>"
    skip_special_tokens = False
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> ExtractedToolCalls:
        start = text.find(self.START)
        if start == -1:
            return ExtractedToolCalls(text)
        calls = []
        for block in self._BLOCK.findall(text[start:]):
            try:
                call = _call(json.loads(block), ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return ExtractedToolCalls(text)  # a malformed block: the model wrote text
            calls.append(call)
        return ExtractedToolCalls(text[:start] or None, calls)

    def content_length(self, text: str) -> int:
        start = text.find(self.START)
        if start != -1:
            return start
        # Hold back an end that may be the start of "<tool_call>".
        for keep in range(min(len(self.START) - 1, len(text)), 0, -1):
            if self.START.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls: the output is ``{"name": ..., "parameters": {...}}`` (after an
    optional ``<|python_tag|>``), several calls separated by ``;``. Anything else is content."""

    PYTHON_TAG = "<|python_tag|>"
    skip_special_tokens = False

    def extract(self, text: str) -> ExtractedToolCalls:
        body = text.strip()
        if body.startswith(self.PYTHON_TAG):
            body = body[len(self.PYTHON_TAG) :].lstrip()
        if not body.startswith("{"):
            return ExtractedToolCalls(text)
        decoder = json.JSONDecoder()
        calls, position = [], 0
        while position < len(body):
            try:
                obj, end = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                return ExtractedToolCalls(text)
            call = _call(obj, ("parameters", "arguments"))
            if call is None:
                return ExtractedToolCalls(text)
            calls.append(call)
            position = end
            while position < len(body) and body[position] in " \t\r\n;":
                position += 1
        return ExtractedToolCalls(None, calls)

    def content_length(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or self.PYTHON_TAG.startswith(body[: len(self.PYTHON_TAG)]):
            return 0  # may be a call: wait for the whole output
        return len(text)
