"""``POST /v1/chat/completions``: the messages through the model's chat template, one request
with ``n`` choices; streams start with a role delta per choice, as OpenAI's do."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from jinja2 import TemplateError

from pagedserve.core.async_engine import RequestStream
from pagedserve.core.outputs import RequestOutput
from pagedserve.core.tokenizer import apply_chat_template
from pagedserve.server.errors import APIError
from pagedserve.server.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
)
from pagedserve.server.serving import (
    ServerState,
    choice_deltas,
    collect,
    event_stream,
    get_state,
    unless_disconnected,
    usage,
)

router = APIRouter()


def render_chat(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    chat_template_kwargs: dict | None,
) -> list[int]:
    """The token ids of the conversation through the chat template; 400 when it cannot render."""
    try:
        return apply_chat_template(
            state.tokenizer,
            [m.model_dump(exclude_none=True) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )
    except TemplateError as exc:
        raise APIError(
            400, f"the chat template cannot render these messages: {exc}", param="messages"
        ) from exc


def _check_supported(body: ChatCompletionRequest) -> None:
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400,
            f"response_format {body.response_format.type!r} is not supported; only 'text'",
            param="response_format",
        )
    if body.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: Annotated[ServerState, Depends(get_state)]
) -> ChatCompletionResponse | Response:
    lora_request = state.check_model(body.model)
    state.check_request(body)
    _check_supported(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    ids = render_chat(state, body.messages, body.add_generation_prompt, body.chat_template_kwargs)
    state.check_length(len(ids), max_tokens)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = body.to_sampling_params(max_tokens, logprobs, None, state.sampling_defaults)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = await state.add(request_id, [{"prompt_token_ids": ids}], params, lora_request)
    if body.stream:
        return event_stream(stream, _chunks(body, state, request_id, stream))
    try:
        outputs = await unless_disconnected(request, collect(stream))
    finally:
        stream.abort()
    if isinstance(outputs, Response):
        return outputs
    (output,) = outputs
    choices = [
        ChatCompletionChoice(
            index=completion.index,
            message=AssistantMessage(content=completion.text),
            logprobs=_logprobs(body, state, completion.token_ids, completion.logprobs),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        for completion in output.outputs
    ]
    return ChatCompletionResponse(
        id=request_id, model=body.model or state.model_name, choices=choices, usage=usage(outputs)
    )


def _logprobs(
    body: ChatCompletionRequest, state: ServerState, token_ids: list[int], entries: list | None
) -> ChoiceLogprobs | None:
    if not body.logprobs or entries is None:
        return None
    return ChoiceLogprobs(content=state.chat_logprobs(token_ids, entries, body.top_logprobs or 0))


async def _chunks(
    body: ChatCompletionRequest, state: ServerState, request_id: str, stream: RequestStream
) -> AsyncIterator[ChatCompletionChunk]:
    created = int(time.time())

    def chunk(choice: ChatStreamChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=body.model or state.model_name, choices=[choice])

    for index in range(body.num_choices):
        yield chunk(ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
    finals: dict[str, RequestOutput] = {}
    async for delta in choice_deltas(stream, body.num_choices, finals):
        if not delta.text and delta.finish_reason is None and not body.logprobs:
            continue  # text held back (a possible stop string) and no logprobs to send
        yield chunk(
            ChatStreamChoice(
                index=delta.index,
                delta=DeltaMessage(content=delta.text or None),
                logprobs=_logprobs(body, state, delta.token_ids, delta.logprobs),
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )
        )
    if body.include_usage:
        yield ChatCompletionChunk(
            id=request_id,
            created=created,
            model=body.model or state.model_name,
            choices=[],
            usage=usage([finals[i] for i in stream.request_ids]),
        )
