"""``POST /v1/completions``: prompts as text or token ids, one request per prompt, ``n``
choices each (choice ``index = prompt * n + i``, as OpenAI and vLLM number them)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from transformers import PreTrainedTokenizerBase

from pagedserve.core.async_engine import RequestStream
from pagedserve.core.engine import PromptType
from pagedserve.core.outputs import RequestOutput
from pagedserve.server.errors import APIError
from pagedserve.server.openapi import json_or_event_stream
from pagedserve.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
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

router = APIRouter()
#: A prompt as given (its text, when it was text) and its token ids.
Prompt = tuple[str | None, list[int]]


def _num_prompts(body: CompletionRequest) -> int:
    prompt = body.prompt
    return len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(text) for text in texts]


async def _prompts(body: CompletionRequest, state: ServerState) -> list[Prompt]:
    """Each prompt's text (if it was text) and token ids, text encoded off the event loop.
    (The request model has refused empty prompts.)"""
    prompt = body.prompt
    if isinstance(prompt, str):
        texts: list[str] = [prompt]
    elif isinstance(prompt[0], str):
        texts = prompt  # type: ignore[assignment]
    elif isinstance(prompt[0], int):
        return [(None, prompt)]  # type: ignore[list-item]
    else:
        return [(None, ids) for ids in prompt]  # type: ignore[misc]
    return list(zip(texts, await state.tokenizers.run(_encode, texts)))


def _check_supported(body: CompletionRequest) -> None:
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    best_of = body.best_of if body.best_of is not None else body.num_choices
    if best_of > body.num_choices and body.stream:
        raise APIError(
            400, "best_of greater than n cannot be streamed: the best are known only at the end",
            param="best_of",
        )


@router.post(
    "/v1/completions", response_model=None, responses=json_or_event_stream(CompletionResponse)
)
async def create_completion(
    body: CompletionRequest, request: Request, state: Annotated[ServerState, Depends(get_state)]
) -> CompletionResponse | Response:
    lora_request = state.check_model(body.model)
    state.check_request(body, _num_prompts(body))
    _check_supported(body)
    prompts = await _prompts(body, state)
    for _, ids in prompts:
        state.check_length(len(ids), body.max_tokens)
    prompt_logprobs = body.prompt_logprobs
    if prompt_logprobs is None and body.echo:
        prompt_logprobs = body.logprobs
    structured, source = structured_outputs_params(body)
    if body.use_beam_search:
        if structured is not None:
            raise APIError(400, f"{source} cannot be used with use_beam_search", param=source)
        longest = max(len(ids) for _, ids in prompts)
        params = body.to_beam_search_params(body.max_tokens or state.max_model_len - longest)
    else:
        params = body.to_sampling_params(
            body.max_tokens, body.logprobs, prompt_logprobs, state.sampling_defaults, structured,
            best_of=body.best_of,
        )
    engine_prompts: list[PromptType] = [
        {"prompt": text, "prompt_token_ids": ids} if text is not None else {"prompt_token_ids": ids}
        for text, ids in prompts
    ]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    try:
        stream = await state.add(request_id, engine_prompts, params, lora_request)
    except ValueError as exc:
        raise schema_error(exc, source) or exc
    if body.stream:
        return event_stream(stream, _chunks(body, state, request_id, prompts, stream))
    outputs = await collect_unless_disconnected(request, stream)
    if isinstance(outputs, Response):
        return outputs
    return CompletionResponse(
        id=request_id,
        model=body.model or state.model_name,
        usage=usage(outputs),
        choices=_choices(body, state, prompts, outputs),
    )


def _echoed(state: ServerState, prompt: Prompt, prompt_logprobs: list | None) -> tuple[str, list[int], list]:
    """The prompt's text, ids and logprobs, to put before the completion's."""
    text, ids = prompt
    prompt_text = text if text is not None else state.tokenizer.decode(ids)
    return prompt_text, ids, list(prompt_logprobs or [])


def _choices(
    body: CompletionRequest, state: ServerState, prompts: list[Prompt], outputs: list[RequestOutput]
) -> list[CompletionChoice]:
    choices = []
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        for completion in output.outputs:
            text, ids, entries = completion.text, completion.token_ids, completion.logprobs or []
            if body.echo:
                prompt_text, prompt_ids, prompt_entries = _echoed(state, prompt, output.prompt_logprobs)
                text, ids, entries = prompt_text + text, prompt_ids + ids, prompt_entries + entries
            logprobs = state.completion_logprobs(ids, entries) if body.logprobs is not None else None
            choices.append(
                CompletionChoice(
                    index=i * body.num_choices + completion.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                    prompt_logprobs=state.prompt_logprobs(output.prompt_logprobs)
                    if body.prompt_logprobs is not None
                    else None,
                )
            )
    return choices


async def _chunks(
    body: CompletionRequest, state: ServerState, request_id: str, prompts: list[Prompt], stream: RequestStream
) -> AsyncIterator[CompletionResponse]:
    created = int(time.time())
    tally = StreamTally()
    text_sent: dict[int, int] = {}  # choice index -> characters sent (logprobs' text_offset)
    n = body.num_choices
    async for delta in choice_deltas(stream, n, tally):
        text, ids, entries = delta.text, delta.token_ids, delta.logprobs or []
        if body.echo and delta.first:
            prompt_text, prompt_ids, prompt_entries = _echoed(state, prompts[delta.index // n], delta.prompt_logprobs)
            text, ids, entries = prompt_text + text, prompt_ids + ids, prompt_entries + entries
        if not text and delta.finish_reason is None and body.logprobs is None:
            continue  # text held back (a possible stop string) and no logprobs to send
        offset = text_sent.get(delta.index, 0)
        text_sent[delta.index] = offset + len(text)
        logprobs = state.completion_logprobs(ids, entries, offset) if body.logprobs is not None else None
        choice = CompletionChoice(
            index=delta.index,
            text=text,
            logprobs=logprobs,
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
        )
        yield CompletionResponse(id=request_id, created=created, model=body.model or state.model_name, choices=[choice])
    if body.include_usage:
        yield CompletionResponse(
            id=request_id, created=created, model=body.model or state.model_name, choices=[], usage=tally.usage()
        )
