"""``POST /v1/chat/completions``: the messages through the model's chat template, one request
with ``n`` choices; streams start with a role delta per choice, as OpenAI's do. Structured
output and tool calls: ``server/structured.py`` and ``server/tools.py``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from pagedserve.core.async_engine import RequestStream
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.core.tokenizer import apply_chat_template
from pagedserve.plugins.structured.tool_parsers import ExtractedToolCalls, ToolParser
from pagedserve.server.errors import APIError
from pagedserve.server.openapi import json_or_event_stream
from pagedserve.server.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionTool,
    ChatMessage,
    ChatStreamChoice,
    ChatTemplateRequest,
    ChoiceLogprobs,
    DeltaMessage,
    ToolChoice,
)
from pagedserve.server.serving import (
    ServerState,
    StreamTally,
    choice_deltas,
    collect_unless_disconnected,
    event_stream,
    get_state,
    usage,
)
from pagedserve.server.structured import schema_error, structured_outputs_params
from pagedserve.server.tools import (
    ToolCallStream,
    effective_tool_choice,
    extract_tool_calls,
    finish_reason,
    template_messages,
    tool_calls,
    tool_grammar,
)

router = APIRouter()


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    chat_template: str | None,
    variables: dict[str, Any],
    tools: list[dict[str, Any]] | None,
) -> list[int]:
    return apply_chat_template(
        tokenizer, template_messages(messages), add_generation_prompt, chat_template, variables, tools
    )


async def render_chat(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[ChatCompletionTool] | None = None,
) -> list[int]:
    """The token ids of the conversation through the chat template, rendered off the event
    loop; 400 when it cannot render, or for a request's own template on a server that does not
    trust them. Tools go to the template as ``tools`` (a template that knows none ignores them)."""
    if chat_template is not None and not state.limits.trust_request_chat_template:
        raise APIError(
            400,
            "chat_template in a request is refused: a template is code the server runs, so only "
            "the model's runs unless the server is started with --trust-request-chat-template",
            param="chat_template",
        )
    dumped = [m.model_dump(exclude_none=True) for m in messages]
    tool_schemas = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
    try:
        return await state.tokenizers.run(
            _render, dumped, add_generation_prompt, chat_template, chat_template_kwargs or {}, tool_schemas
        )
    except (TemplateError, TypeError) as exc:  # the template's own errors, on these messages
        raise APIError(
            400, f"the chat template cannot render these messages: {exc}", param="messages"
        ) from exc


def render_chat_request(
    state: ServerState, body: ChatTemplateRequest, tools: list[ChatCompletionTool] | None = None
) -> Awaitable[list[int]]:
    """``render_chat`` with a request's messages and template fields."""
    return render_chat(
        state, body.messages, body.add_generation_prompt, body.chat_template, body.chat_template_kwargs, tools
    )


def _check_supported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")


def _sampling_params(
    body: ChatCompletionRequest, state: ServerState, choice: ToolChoice, max_tokens: int | None
) -> tuple[SamplingParams, str | None]:
    """The engine's parameters, with the constraint of the request or of its tool choice, and
    the request field the constraint came from."""
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    structured, source = structured_outputs_params(body)
    forced = tool_grammar(body.tools or [], choice, body.parallel_tool_calls)
    if forced is not None:
        if structured is not None:
            raise APIError(400, f"{source} cannot be combined with tool_choice {choice!r}", param=source)
        structured, source = forced, "tools"
    params = body.to_sampling_params(max_tokens, logprobs, body.prompt_logprobs, state.sampling_defaults, structured)
    if choice == "auto" and state.tool_parser is not None:
        params.skip_special_tokens = body.skip_special_tokens and state.tool_parser.skip_special_tokens
    return params, source


def _check_beam_search(body: ChatCompletionRequest) -> None:
    """Beams are scored by the model alone: no constraint or tool grammar can join them."""
    structured, source = structured_outputs_params(body)
    if structured is not None:
        raise APIError(400, f"{source} cannot be used with use_beam_search", param=source)
    if body.tools:
        raise APIError(400, "tools cannot be used with use_beam_search", param="tools")


@router.post(
    "/v1/chat/completions", response_model=None, responses=json_or_event_stream(ChatCompletionResponse)
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: Annotated[ServerState, Depends(get_state)]
) -> ChatCompletionResponse | Response:
    lora_request = state.check_model(body.model)
    state.check_request(body)
    _check_supported(body)
    choice = effective_tool_choice(body.tools, body.tool_choice, state.tool_parser)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    ids = await render_chat_request(state, body, body.tools)
    state.check_length(len(ids), max_tokens)
    if body.use_beam_search:
        _check_beam_search(body)
        params, source = body.to_beam_search_params(max_tokens or state.max_model_len - len(ids)), None
    else:
        params, source = _sampling_params(body, state, choice, max_tokens)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        stream = await state.add(request_id, [{"prompt_token_ids": ids}], params, lora_request)
    except ValueError as exc:
        raise schema_error(exc, source) or exc
    parser = state.tool_parser if choice == "auto" else None
    if body.stream:
        return event_stream(stream, _chunks(body, state, request_id, stream, choice, parser))
    outputs = await collect_unless_disconnected(request, stream)
    if isinstance(outputs, Response):
        return outputs
    (output,) = outputs
    choices = []
    for completion in output.outputs:
        extracted = extract_tool_calls(completion.text, choice, parser)
        choices.append(
            ChatCompletionChoice(
                index=completion.index,
                message=AssistantMessage(content=extracted.content, tool_calls=tool_calls(extracted) or []),
                logprobs=_logprobs(body, state, completion.token_ids, completion.logprobs),
                finish_reason=finish_reason(completion.finish_reason, choice, extracted),
                stop_reason=completion.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=request_id,
        model=body.model or state.model_name,
        choices=choices,
        usage=usage(outputs),
        prompt_logprobs=state.prompt_logprobs(output.prompt_logprobs),
    )


def _logprobs(
    body: ChatCompletionRequest, state: ServerState, token_ids: list[int], entries: list | None
) -> ChoiceLogprobs | None:
    if not body.logprobs or entries is None:
        return None
    return ChoiceLogprobs(content=state.chat_logprobs(token_ids, entries, body.top_logprobs or 0))


async def _chunks(
    body: ChatCompletionRequest,
    state: ServerState,
    request_id: str,
    stream: RequestStream,
    choice: ToolChoice,
    parser: ToolParser | None,
) -> AsyncIterator[ChatCompletionChunk]:
    created = int(time.time())

    def chunk(choice: ChatStreamChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=body.model or state.model_name, choices=[choice])

    for index in range(body.num_choices):
        yield chunk(ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
    tally = StreamTally()
    calls = {index: ToolCallStream(choice, parser) for index in range(body.num_choices)}
    async for delta in choice_deltas(stream, body.num_choices, tally):
        content, call_deltas = calls[delta.index].feed(delta.text, delta.finish_reason is not None)
        if not content and not call_deltas and delta.finish_reason is None and not body.logprobs:
            continue  # text held back (a possible stop string or call) and no logprobs to send
        extracted = ExtractedToolCalls(None, calls[delta.index].calls)
        yield chunk(
            ChatStreamChoice(
                index=delta.index,
                delta=DeltaMessage(content=content, tool_calls=call_deltas or None),
                logprobs=_logprobs(body, state, delta.token_ids, delta.logprobs),
                finish_reason=finish_reason(delta.finish_reason, choice, extracted),
                stop_reason=delta.stop_reason,
            )
        )
    if body.include_usage:
        yield ChatCompletionChunk(
            id=request_id,
            created=created,
            model=body.model or state.model_name,
            choices=[],
            usage=tally.usage(),
        )
