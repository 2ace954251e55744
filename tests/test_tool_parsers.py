"""Tool-call parsing without a model: the built-in parsers, the streamed pieces of every tool
choice reassembling to the whole output's calls, the tool grammar's schema, the server's tool
flags and a tool-aware chat template rendering earlier calls and their results."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from pagedserve.core.plugins import PluginManager
from pagedserve.core.tokenizer import apply_chat_template
from pagedserve.plugins.structured.tool_parsers import HermesToolParser, Llama3JsonToolParser
from pagedserve.server.protocol import ChatCompletionTool, NamedToolChoice
from pagedserve.server.tools import (
    ToolCallStream,
    ToolOptions,
    check_tool_options,
    extract_tool_calls,
    template_messages,
    tool_grammar,
)

WEATHER = {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}


def test_hermes_finds_calls_after_content() -> None:
    parser = HermesToolParser(None)
    text = f"Checking. <tool_call>{json.dumps(WEATHER)}</tool_call>\n<tool_call>" + '{"name": "now"}</tool_call>'
    extracted = parser.extract(text)
    assert extracted.content == "Checking. "
    assert [(c.name, json.loads(c.arguments)) for c in extracted.calls] == [
        ("get_weather", WEATHER["arguments"]), ("now", {})
    ]
    assert parser.extract("no calls here").calls == []
    assert parser.extract("<tool_call>{not json</tool_call>").content == "<tool_call>{not json</tool_call>"
    assert parser.content_length("Sure <tool") == len("Sure ")
    assert parser.content_length("Sure <b>") == len("Sure <b>")


def test_llama3_json_finds_semicolon_separated_calls() -> None:
    parser = Llama3JsonToolParser(None)
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    extracted = parser.extract(text)
    assert extracted.content is None
    assert [(c.name, json.loads(c.arguments)) for c in extracted.calls] == [("a", {"x": 1}), ("b", {})]
    assert parser.extract("Hello {there}").calls == []
    assert parser.content_length('{"name"') == 0 and parser.content_length("Hi") == 2


def _stream(choice, parser, text: str, pieces: int = 7) -> tuple[str, list]:
    """Feed ``text`` in ``pieces`` chunks; return the content sent and the calls reassembled."""
    stream = ToolCallStream(choice, parser)
    content, calls = "", {}
    step = max(1, len(text) // pieces)
    chunks = [text[i : i + step] for i in range(0, len(text), step)]
    for i, chunk in enumerate(chunks):
        sent, deltas = stream.feed(chunk, finished=i == len(chunks) - 1)
        content += sent or ""
        for delta in deltas:
            call = calls.setdefault(delta.index, ["", ""])
            call[0] += delta.function.name or ""
            call[1] += delta.function.arguments or ""
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize(
    ("choice", "parser", "text"),
    [
        ("required", None, json.dumps([{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": [2]}}])),
        (NamedToolChoice(function={"name": "f"}), None, '{"city": "Oslo", "days": 3}'),
        ("auto", HermesToolParser(None), f"Hm <tool_call>{json.dumps(WEATHER)}</tool_call>"),
        ("auto", Llama3JsonToolParser(None), '{"name": "a", "parameters": {"k": "v"}}'),
        ("auto", HermesToolParser(None), "just text, <no> calls"),
        ("none", None, "plain"),
    ],
    ids=["required", "named", "hermes", "llama3", "hermes-text", "none"],
)
def test_streamed_pieces_reassemble_to_the_whole(choice, parser, text) -> None:
    whole = extract_tool_calls(text, choice, parser)
    content, calls = _stream(choice, parser, text)
    assert content == (whole.content or "")
    assert calls == [(c.name, c.arguments) for c in whole.calls]


def test_required_cut_short_keeps_the_complete_calls() -> None:
    text = '[{"name": "a", "parameters": {}}, {"name": "b", "param'
    extracted = extract_tool_calls(text, "required", None)
    assert [c.name for c in extracted.calls] == ["a"]
    assert extract_tool_calls('[{"na', "required", None).content == '[{"na'


def test_tool_grammar_schemas() -> None:
    tools = [ChatCompletionTool(function={"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}),
             ChatCompletionTool(function={"name": "b"})]
    required = tool_grammar(tools, "required", parallel_tool_calls=False).json
    assert required["maxItems"] == 1 and required["minItems"] == 1
    assert [item["properties"]["name"]["enum"] for item in required["items"]["anyOf"]] == [["a"], ["b"]]
    named = tool_grammar(tools, NamedToolChoice(function={"name": "a"}), True).json
    assert named == tools[0].function.parameters
    assert tool_grammar(tools, "auto", True) is None and tool_grammar(tools, "none", True) is None


def test_tool_flags_are_checked() -> None:
    plugins = PluginManager()
    plugins.load_entry_points()
    check_tool_options(ToolOptions(True, "hermes"), plugins)
    check_tool_options(ToolOptions(), plugins)
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        check_tool_options(ToolOptions(True, None), plugins)
    with pytest.raises(ValueError, match="with --enable-auto-tool-choice"):
        check_tool_options(ToolOptions(False, "hermes"), plugins)
    with pytest.raises(ValueError, match="unknown --tool-call-parser 'nope'; known: hermes, llama3_json"):
        check_tool_options(ToolOptions(True, "nope"), plugins)


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}\n{% endfor %}"
    "{% elif m.role == 'tool' %}RESULT[{{ m.tool_call_id }}] {{ m.content }}\n"
    "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
)


def test_a_tool_aware_template_renders_calls_and_results(tokenizer_dir) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    messages = template_messages([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "snow"},
    ])
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    text = tokenizer.decode(apply_chat_template(tokenizer, messages, add_generation_prompt=False, tools=tools))
    assert text == 'TOOLS:get_weather\nuser: Weather?\nCALL get_weather {"city": "Oslo"}\nRESULT[c1] snow\n'
