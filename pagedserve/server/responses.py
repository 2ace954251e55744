"""``POST /v1/responses`` and ``GET /v1/responses/{id}``: OpenAI's Responses API for text and
function tools, as vLLM serves it. The input (a string or message, ``function_call`` and
``function_call_output`` items, after the ``instructions`` as a system message, after the
conversation of ``previous_response_id``) goes through the chat template as one request.
``text.format`` json_schema / json_object constrain the output through the structured-output
backend; ``tools`` and ``tool_choice`` go through the chat route's tool calling
(``server/responses_tools.py``) and come back as ``function_call`` output items. Responses are
kept in a bounded in-memory store unless ``store`` is false.

Streams send OpenAI's typed events (``event: <type>``): ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` ..., ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, ``response.completed`` (with usage; its status is
``incomplete`` when ``max_output_tokens`` ran out, as vLLM sends it). A function call is an
item of its own: ``response.output_item.added``, ``response.function_call_arguments.delta`` ...,
``response.function_call_arguments.done``, ``response.output_item.done``.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from pagedserve.core.async_engine import RequestStream
from pagedserve.core.outputs import RequestOutput
from pagedserve.core.sampling_params import SamplingParams, StructuredOutputsParams
from pagedserve.plugins.structured.tool_parsers import ToolParser
from pagedserve.server.chat import render_chat
from pagedserve.server.errors import APIError
from pagedserve.server.protocol import (
    GENERATION_CONFIG_FIELDS,
    ChatCompletionTool,
    ChatMessage,
    DeltaToolCall,
    ToolChoice,
)
from pagedserve.server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolCall,
    IncompleteDetails,
    InputTokensDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextConfig,
)
from pagedserve.server.responses_tools import (
    call_message,
    chat_tool_choice,
    chat_tools,
    function_calls,
    new_function_call,
    output_message,
    reply_message,
)
from pagedserve.server.serving import ServerState, collect_unless_disconnected, event_stream, get_state
from pagedserve.server.structured import schema_error
from pagedserve.server.tools import ToolCallStream, effective_tool_choice, extract_tool_calls, tool_grammar

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
    if body.background:
        raise APIError(400, "background responses are not supported", param="background")
    if body.top_logprobs:
        raise APIError(400, "top_logprobs is not supported by /v1/responses", param="top_logprobs")


def _input_messages(body: ResponsesRequest) -> list[ChatMessage]:
    if isinstance(body.input, str):
        return [ChatMessage(role="user", content=body.input)]
    messages: list[ChatMessage] = []
    for item in body.input:
        if isinstance(item, FunctionCallItem):
            call_message(item, messages)
            continue
        if isinstance(item, FunctionCallOutputItem):
            messages.append(output_message(item))
            continue
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


def _sampling_params(
    body: ResponsesRequest, state: ServerState, tools: list[ChatCompletionTool] | None, choice: ToolChoice
) -> tuple[SamplingParams, str | None]:
    """The engine's parameters and the request field their constraint came from."""
    given = {name: getattr(body, name) for name in GENERATION_CONFIG_FIELDS}
    sampling = {name: value for name, value in given.items() if value is not None}
    structured, source = _structured_outputs(body), "text.format"
    forced = tool_grammar(tools or [], choice, body.parallel_tool_calls is not False)
    if forced is not None:
        if structured is not None:
            raise APIError(400, f"text.format cannot be combined with tool_choice {choice!r}", param="text.format")
        structured, source = forced, "tools"
    params = SamplingParams(
        **{**state.sampling_defaults, **sampling},
        seed=body.seed,
        max_tokens=body.max_output_tokens,
        structured_outputs=structured,
    )
    if choice == "auto" and state.tool_parser is not None:
        params.skip_special_tokens = state.tool_parser.skip_special_tokens
    return params, source


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
    tools = chat_tools(body.tools)
    choice = effective_tool_choice(tools, chat_tool_choice(body.tool_choice), state.tool_parser)
    conversation = [*history, *_input_messages(body)]
    system = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    ids = await render_chat(state, [*system, *conversation], tools=tools)
    state.check_length(len(ids), body.max_output_tokens)
    params, source = _sampling_params(body, state, tools, choice)
    response_id = f"resp_{uuid.uuid4().hex}"
    try:
        stream = await state.add(response_id, [{"prompt_token_ids": ids}], params)
    except ValueError as exc:  # the grammar backend refused the schema
        raise schema_error(exc, source) or exc
    draft = Draft(body, state, store, response_id, f"msg_{uuid.uuid4().hex}", conversation, choice)
    if body.stream:
        return event_stream(stream, _events(draft, stream), typed_events=True)
    outputs = await collect_unless_disconnected(request, stream)
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
    choice: ToolChoice

    @property
    def parser(self) -> ToolParser | None:
        return self.state.tool_parser if self.choice == "auto" else None

    def response(self, status: str, output: list[OutputItem], **fields: Any) -> ResponseObject:
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
            parallel_tool_calls=body.parallel_tool_calls is not False,
            tools=body.tools or [],
            tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
            **fields,
        )

    def message(self, text: str, status: str) -> OutputMessage:
        return OutputMessage(id=self.message_id, status=status, content=[OutputText(text=text)])

    def finish(
        self, output: RequestOutput, content: str | None = None, calls: list[FunctionToolCall] | None = None
    ) -> ResponseObject:
        """The final response of the engine's final output, stored unless ``store`` is false.
        Its text and calls are extracted from the output unless a stream gives the ones it sent."""
        completion = output.outputs[0]
        status = "incomplete" if completion.finish_reason == "length" else "completed"
        if calls is None:
            extracted = extract_tool_calls(completion.text, self.choice, self.parser)
            content, calls = extracted.content, function_calls(extracted, status)
        for call in calls:
            call.status = status
        items: list[OutputItem] = [self.message(content or "", status)] if content or not calls else []
        prompt_tokens, output_tokens = len(output.prompt_token_ids), len(completion.token_ids)
        response = self.response(
            status,
            [*items, *calls],
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            usage=ResponseUsage(
                input_tokens=prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=output.num_cached_tokens),
                output_tokens=output_tokens,
                total_tokens=prompt_tokens + output_tokens,
            ),
        )
        if self.body.store is not False:
            reply = reply_message(content, calls)
            self.store.put(StoredResponse(response, [*self.conversation, reply]))
        return response


@dataclass
class _StreamedItems:
    """The output items of a stream as it sends them: one open at a time, in order."""

    event: Callable[..., StreamEvent]
    draft: Draft
    content: str = ""
    calls: list[FunctionToolCall] = field(default_factory=list)
    open_kind: str | None = None
    index: int = -1
    #: The status of items as they close: the response's, once it is known.
    status: str = "completed"

    def text(self, delta: str) -> Iterator[StreamEvent]:
        if self.open_kind != "message":
            yield from self.close()
            self.index, self.open_kind = self.index + 1, "message"
            item = self.draft.message("", "in_progress")
            yield self.event("response.output_item.added", output_index=self.index, item=item)
            yield self.event("response.content_part.added", **self._where(), content_index=0, part=OutputText(text=""))
        if not delta:
            return
        self.content += delta
        yield self.event("response.output_text.delta", **self._where(), content_index=0, delta=delta, logprobs=[])

    def call(self, delta: DeltaToolCall) -> Iterator[StreamEvent]:
        if delta.id is not None:  # a new call
            yield from self.close()
            self.index, self.open_kind = self.index + 1, "function_call"
            call = new_function_call(delta.function.name or "", "", call_id=delta.id, status="in_progress")
            self.calls.append(call)
            yield self.event("response.output_item.added", output_index=self.index, item=call)
        arguments = delta.function.arguments
        if arguments:
            self.calls[-1].arguments += arguments
            yield self.event("response.function_call_arguments.delta", **self._where(), delta=arguments)

    def close(self) -> Iterator[StreamEvent]:
        """Events closing the open item, with its status the response's (set by ``finish``)."""
        if self.open_kind == "message":
            message = self.draft.message(self.content, self.status)
            text = message.content[0]
            yield self.event("response.output_text.done", **self._where(), content_index=0, text=text.text, logprobs=[])
            yield self.event("response.content_part.done", **self._where(), content_index=0, part=text)
            yield self.event("response.output_item.done", output_index=self.index, item=message)
        elif self.open_kind == "function_call":
            call = self.calls[-1]
            call.status = self.status
            yield self.event("response.function_call_arguments.done", **self._where(), arguments=call.arguments)
            yield self.event("response.output_item.done", output_index=self.index, item=call)
        self.open_kind = None

    def _where(self) -> dict[str, Any]:
        item_id = self.draft.message_id if self.open_kind == "message" else self.calls[-1].id
        return {"item_id": item_id, "output_index": self.index}


async def _events(draft: Draft, stream: RequestStream) -> AsyncIterator[StreamEvent]:
    sequence = iter(range(1 << 62))

    def event(kind: str, **fields: Any) -> StreamEvent:
        dumped = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in fields.items()}
        return StreamEvent(type=kind, sequence_number=next(sequence), **dumped)

    yield event("response.created", response=draft.response("in_progress", []))
    yield event("response.in_progress", response=draft.response("in_progress", []))
    items = _StreamedItems(event, draft)
    tool_calls = ToolCallStream(draft.choice, draft.parser)
    final: RequestOutput | None = None
    async for output in stream:
        final = output
        completion = output.outputs[0]
        content, call_deltas = tool_calls.feed(completion.delta_text, completion.finish_reason is not None)
        for piece in ([content] if content else []):
            for sent in items.text(piece):
                yield sent
        for delta in call_deltas:
            for sent in items.call(delta):
                yield sent
    if final is None:  # the stream ends only once the request has finished
        return
    if items.index < 0:  # nothing came: an empty message, as the whole response has
        for sent in items.text(""):
            yield sent
    response = draft.finish(final, items.content, items.calls)
    items.status = response.status
    for sent in items.close():
        yield sent
    yield event("response.completed", response=response)
