"""``POST /v1/responses`` and ``GET /v1/responses/{id}``: OpenAI's Responses API for text, as vLLM
serves it. The input (a string or message items, after the ``instructions`` as a system
message, after the conversation of ``previous_response_id``) goes through the chat template as
one request. ``text.format`` json_schema / json_object constrain the output through the
structured-output backend. Responses are kept in a bounded in-memory store unless ``store`` is
false.

Streams send OpenAI's typed events (``event: <type>``): ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` ..., ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, ``response.completed`` (with usage; its status is
``incomplete`` when ``max_output_tokens`` ran out, as vLLM sends it).
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from pagedserve.core.async_engine import RequestStream
from pagedserve.core.outputs import RequestOutput
from pagedserve.core.sampling_params import SamplingParams, StructuredOutputsParams
from pagedserve.server.chat import render_chat
from pagedserve.server.errors import APIError
from pagedserve.server.protocol import GENERATION_CONFIG_FIELDS, ChatMessage
from pagedserve.server.responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextConfig,
)
from pagedserve.server.serving import ServerState, collect, event_stream, get_state, unless_disconnected
from pagedserve.server.structured import schema_error

router = APIRouter()
#: Responses kept for ``GET`` and ``previous_response_id``; the oldest go first.
STORE_CAPACITY = 1024


@dataclass
class StoredResponse:
    response: ResponseObject
    #: The conversation it ended, its own output last (without the instructions, which
    #: OpenAI does not carry over to a continuation).
    messages: list[ChatMessage]


class ResponseStore:
    """A bounded, thread-safe map of response id -> stored response (least recently used out)."""

    def __init__(self, capacity: int = STORE_CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, item: StoredResponse) -> None:
        with self._lock:
            self._items[item.response.id] = item
            self._items.move_to_end(item.response.id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(response_id)
            if item is not None:
                self._items.move_to_end(response_id)
            return item

    def __len__(self) -> int:
        return len(self._items)


def get_store(request: Request) -> ResponseStore:
    app_state = request.app.state
    if not hasattr(app_state, "responses_store"):
        app_state.responses_store = ResponseStore()
    return app_state.responses_store


class StreamEvent(BaseModel):
    """One typed event of a response stream."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


def _check_supported(body: ResponsesRequest) -> None:
    if body.tools:
        raise APIError(
            400, "tools are not supported by /v1/responses yet; /v1/chat/completions serves tool calling",
            param="tools",
        )
    if body.background:
        raise APIError(400, "background responses are not supported", param="background")
    if body.top_logprobs:
        raise APIError(400, "top_logprobs is not supported by /v1/responses", param="top_logprobs")


def _input_messages(body: ResponsesRequest) -> list[ChatMessage]:
    if isinstance(body.input, str):
        return [ChatMessage(role="user", content=body.input)]
    messages = []
    for item in body.input:
        content = item.content
        if isinstance(content, list):
            for part in content:
                if part.type not in ("input_text", "output_text", "text"):
                    raise APIError(
                        400, f"input content of type {part.type!r} is not supported; only text", param="input"
                    )
            content = "".join(part.text for part in content)
        role = "system" if item.role == "developer" else item.role
        messages.append(ChatMessage(role=role, content=content))
    if not messages:
        raise APIError(400, "input is empty: give a string or at least one message", param="input")
    return messages


def _structured_outputs(body: ResponsesRequest) -> StructuredOutputsParams | None:
    """``text.format`` as the structured-output constraint (server/structured.py's backend)."""
    text_format = body.text.format if body.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if text_format.json_schema is None:
        raise APIError(400, "text.format of type json_schema needs a schema", param="text.format")
    try:
        return StructuredOutputsParams(json=text_format.json_schema)
    except ValueError as exc:
        raise APIError(400, f"text.format: {exc}", param="text.format") from None


def _sampling_params(body: ResponsesRequest, state: ServerState) -> SamplingParams:
    given = {name: getattr(body, name) for name in GENERATION_CONFIG_FIELDS}
    sampling = {name: value for name, value in given.items() if value is not None}
    return SamplingParams(
        **{**state.sampling_defaults, **sampling},
        seed=body.seed,
        max_tokens=body.max_output_tokens,
        structured_outputs=_structured_outputs(body),
    )


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    state: Annotated[ServerState, Depends(get_state)],
    store: Annotated[ResponseStore, Depends(get_store)],
) -> ResponseObject | Response:
    state.check_model(body.model)
    _check_supported(body)
    history: list[ChatMessage] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise APIError(
                404,
                f"Previous response with id '{body.previous_response_id}' not found.",
                param="previous_response_id",
            )
        history = previous.messages
    conversation = [*history, *_input_messages(body)]
    system = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    ids = await render_chat(state, [*system, *conversation])
    state.check_length(len(ids), body.max_output_tokens)
    params = _sampling_params(body, state)
    response_id = f"resp_{uuid.uuid4().hex}"
    try:
        stream = await state.add(response_id, [{"prompt_token_ids": ids}], params)
    except ValueError as exc:  # the grammar backend refused the schema
        raise schema_error(exc, "text.format") or exc
    draft = Draft(body, state, store, response_id, f"msg_{uuid.uuid4().hex}", conversation)
    if body.stream:
        return event_stream(stream, _events(draft, stream), typed_events=True)
    try:
        outputs = await unless_disconnected(request, collect(stream))
    finally:
        stream.abort()
    if isinstance(outputs, Response):
        return outputs
    (output,) = outputs
    return draft.finish(output)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(
    response_id: str, store: Annotated[ResponseStore, Depends(get_store)]
) -> ResponseObject:
    item = store.get(response_id)
    if item is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
    return item.response


@dataclass
class Draft:
    """A response being made: what its request asked, until the output is complete."""

    body: ResponsesRequest
    state: ServerState
    store: ResponseStore
    response_id: str
    message_id: str
    conversation: list[ChatMessage]

    def response(self, status: str, output: list[OutputMessage], **fields: Any) -> ResponseObject:
        body = self.body
        return ResponseObject(
            id=self.response_id,
            status=status,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=self.state.model_name,
            output=output,
            previous_response_id=body.previous_response_id,
            store=body.store is not False,
            temperature=body.temperature,
            top_p=body.top_p,
            text=body.text or TextConfig(),
            user=body.user,
            metadata=body.metadata or {},
            **fields,
        )

    def message(self, text: str, status: str) -> OutputMessage:
        return OutputMessage(id=self.message_id, status=status, content=[OutputText(text=text)])

    def finish(self, output: RequestOutput) -> ResponseObject:
        """The final response of the engine's final output, stored unless ``store`` is false."""
        completion = output.outputs[0]
        status = "incomplete" if completion.finish_reason == "length" else "completed"
        prompt_tokens, output_tokens = len(output.prompt_token_ids), len(completion.token_ids)
        response = self.response(
            status,
            [self.message(completion.text, status)],
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            usage=ResponseUsage(
                input_tokens=prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=output.num_cached_tokens),
                output_tokens=output_tokens,
                total_tokens=prompt_tokens + output_tokens,
            ),
        )
        if self.body.store is not False:
            reply = ChatMessage(role="assistant", content=completion.text)
            self.store.put(StoredResponse(response, [*self.conversation, reply]))
        return response


async def _events(draft: Draft, stream: RequestStream) -> AsyncIterator[StreamEvent]:
    sequence = iter(range(1 << 62))

    def event(kind: str, **fields: Any) -> StreamEvent:
        dumped = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in fields.items()}
        return StreamEvent(type=kind, sequence_number=next(sequence), **dumped)

    where = {"item_id": draft.message_id, "output_index": 0}
    yield event("response.created", response=draft.response("in_progress", []))
    yield event("response.in_progress", response=draft.response("in_progress", []))
    yield event("response.output_item.added", output_index=0, item=draft.message("", "in_progress"))
    yield event("response.content_part.added", **where, content_index=0, part=OutputText(text=""))
    final: RequestOutput | None = None
    async for output in stream:
        final = output
        delta = output.outputs[0].delta_text
        if delta:
            yield event("response.output_text.delta", **where, content_index=0, delta=delta, logprobs=[])
    if final is None:  # the stream ends only once the request has finished
        return
    response = draft.finish(final)
    (message,) = response.output
    text = message.content[0]
    yield event("response.output_text.done", **where, content_index=0, text=text.text, logprobs=[])
    yield event("response.content_part.done", **where, content_index=0, part=text)
    yield event("response.output_item.done", output_index=0, item=message)
    yield event("response.completed", response=response)
