"""What the completion and chat routes share: the server state, request checks, logprob
formats, Server-Sent Events framing, and aborting requests whose client went away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from starlette.background import BackgroundTask
from transformers import PreTrainedTokenizerBase

from pagedserve.core.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from pagedserve.core.beam_search import BeamSearchParams
from pagedserve.core.engine import PromptType
from pagedserve.core.lora import LoRARequest
from pagedserve.core.outputs import RequestOutput
from pagedserve.core.sampling import TokenLogprobs
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.plugins.structured.tool_parsers import ToolParser
from pagedserve.server.errors import APIError, error_body
from pagedserve.server.limits import ServerLimits
from pagedserve.server.protocol import (
    CompletionLogProbs,
    PromptLogprob,
    PromptLogprobs,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from pagedserve.server.tokenizer_pool import TokenizerPool

if TYPE_CHECKING:
    from pagedserve.server.lora import ServedAdapters

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: JSON has no -inf: logprobs are clamped here, as vLLM does.
MIN_LOGPROB = -9999.0
SSE_DONE = format_sse_event(data_str="[DONE]")


@dataclass
class ServerState:
    """What every route needs, kept on ``app.state.server``."""

    engine: AsyncLLMEngine
    #: The server's own tokenizer: the engine's belongs to the engine thread. Work that grows
    #: with the request (encoding prompts, rendering templates, decoding) goes to ``tokenizers``.
    tokenizer: PreTrainedTokenizerBase
    tokenizers: TokenizerPool
    model_name: str
    model_path: str
    max_model_len: int
    max_num_seqs: int
    vocab_size: int
    #: Sampling defaults from the model's generation_config.json.
    sampling_defaults: dict[str, Any]
    #: The metrics ``/metrics`` exports.
    registry: CollectorRegistry
    limits: ServerLimits
    api_key: str | None = None
    #: The LoRA adapters served as models (``--enable-lora``), or None.
    adapters: ServedAdapters | None = None
    #: The parser of ``tool_choice="auto"`` (``--enable-auto-tool-choice --tool-call-parser``).
    tool_parser: ToolParser | None = None

    @property
    def max_seqs_per_request(self) -> int:
        return self.limits.seqs_per_request(self.max_num_seqs)

    def check_model(self, name: str | None) -> LoRARequest | None:
        """The adapter the request's ``model`` names (None: the base model); 404 for others."""
        if name is None or name == self.model_name:
            return None
        if self.adapters is not None and name in self.adapters.adapters:
            return self.adapters.adapters[name]
        raise APIError(404, f"The model `{name}` does not exist.", param="model")

    def check_request(self, body: SamplingRequest, num_prompts: int = 1) -> None:
        """The request's own limits: its sequences (every prompt's ``n``) under the per-request
        cap, so that one request cannot take every seat of a step."""
        seqs, cap = body.num_seqs_per_prompt * num_prompts, self.max_seqs_per_request
        if seqs > cap:
            per_prompt = f"n={body.num_seqs_per_prompt}" + (f" x {num_prompts} prompts" if num_prompts > 1 else "")
            raise APIError(
                400,
                f"this request asks for {seqs} sequences ({per_prompt}), more than the {cap} this "
                f"server allows a request (--max-num-seqs-per-request; max_num_seqs is {self.max_num_seqs})",
                param="n",
            )
        if body.use_beam_search:
            for name in ("logprobs", "prompt_logprobs", "best_of"):
                value = getattr(body, name, None)
                if value is not None and value is not False:
                    raise APIError(400, f"{name} cannot be used with use_beam_search", param=name)
        if body.prompt_logprobs is not None and body.stream:
            raise APIError(
                400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs"
            )
        if body.stream_options is not None and not body.stream:
            raise APIError(
                400, "stream_options can only be given when stream is true", param="stream_options"
            )

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """vLLM's checks and wording: the prompt must leave room for the output."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, "
                f"your request has {num_prompt_tokens} input tokens. Please reduce the "
                "length of the input messages.",
            )
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. "
                f"This model's maximum context length is {limit} tokens and your request "
                f"has {num_prompt_tokens} input tokens ({max_tokens} > {limit} - "
                f"{num_prompt_tokens}).",
                param="max_tokens",
            )

    async def add(
        self, request_id: str, prompts: list[PromptType], params: SamplingParams | BeamSearchParams,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Add one engine request per prompt (ids ``request_id-i``)."""
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        return await self.engine.add_requests(ids, prompts, params, lora_request)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (as in the engine's logprobs)."""
        return self.tokenizer.backend_tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(
        self, token_ids: list[int], entries: list[TokenLogprobs | None], text_offset: int = 0
    ) -> CompletionLogProbs:
        """The legacy completions format; an entry is None where there is no logprob (the
        first prompt token). ``top_logprobs`` holds the top tokens and the chosen one."""
        result = CompletionLogProbs()
        for token_id, entry in zip(token_ids, entries):
            token = self.token_text(token_id)
            result.tokens.append(token)
            result.text_offset.append(text_offset)
            text_offset += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(max(entry[token_id].logprob, MIN_LOGPROB))
            ranked = sorted(entry.items(), key=lambda item: item[1].rank)
            result.top_logprobs.append({self.token_text(t): max(lp.logprob, MIN_LOGPROB) for t, lp in ranked})
        return result

    def prompt_logprobs(self, entries: list[TokenLogprobs | None] | None) -> PromptLogprobs | None:
        """vLLM's ``prompt_logprobs`` extra: per prompt token, token id -> logprob, rank, text."""
        if entries is None:
            return None
        return [
            None
            if entry is None
            else {
                str(token): PromptLogprob(
                    logprob=max(lp.logprob, MIN_LOGPROB), rank=lp.rank, decoded_token=self.token_text(token)
                )
                for token, lp in entry.items()
            }
            for entry in entries
        ]

    def chat_logprobs(
        self, token_ids: list[int], entries: list[TokenLogprobs], num_top: int
    ) -> list[TokenLogprob]:
        """The chat format: each token with its bytes and its ``num_top`` most likely tokens."""
        result = []
        for token_id, entry in zip(token_ids, entries):
            ranked = sorted(entry.items(), key=lambda item: item[1].rank)[:num_top]
            top = [self._top_logprob(t, lp.logprob) for t, lp in ranked]
            chosen = self._top_logprob(token_id, entry[token_id].logprob)
            result.append(TokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return result

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.token_text(token_id)
        return TopLogprob(token=token, logprob=max(logprob, MIN_LOGPROB), bytes=list(token.encode()))


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def usage(outputs: list[RequestOutput]) -> UsageInfo:
    """Exact token counts: each prompt once, every generated token of every choice."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclass
class ChoiceDelta:
    """What one streamed output brings to one choice."""

    index: int
    output: RequestOutput
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None
    first: bool
    #: The request's prompt logprobs (``[None, ...]``), when it asked for them.
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class StreamTally:
    """What a stream of DELTA outputs added up to: the usage, and each request's prompt
    logprobs (only its first output carries them)."""

    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)

    def add(self, output: RequestOutput) -> None:
        self.prompt_tokens[output.request_id] = len(output.prompt_token_ids)
        self.completion_tokens += sum(len(c.token_ids) for c in output.outputs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs[output.request_id] = output.prompt_logprobs

    def usage(self) -> UsageInfo:
        prompt = sum(self.prompt_tokens.values())
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt + self.completion_tokens,
        )


async def choice_deltas(stream: RequestStream, n: int, tally: StreamTally) -> AsyncIterator[ChoiceDelta]:
    """The new tokens and text of each choice (index ``prompt * n + i``) as the stream's DELTA
    outputs come, until every choice finished; ``tally`` adds them up."""
    prompt_index = {request_id: i for i, request_id in enumerate(stream.request_ids)}
    started: set[int] = set()
    finished: set[int] = set()
    async for output in stream:
        tally.add(output)
        for completion in output.outputs:
            index = prompt_index[output.request_id] * n + completion.index
            new_ids = completion.token_ids
            if index in finished or not (new_ids or completion.delta_text or completion.finish_reason):
                continue
            first = index not in started
            started.add(index)
            if completion.finish_reason is not None:
                finished.add(index)
            yield ChoiceDelta(
                index=index,
                output=output,
                text=completion.delta_text,
                token_ids=new_ids,
                logprobs=completion.logprobs,
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
                first=first,
                prompt_logprobs=tally.prompt_logprobs.get(output.request_id),
            )


async def collect(stream: RequestStream) -> list[RequestOutput]:
    """The final output of each request of the stream, in the order they were added."""
    finals: dict[str, RequestOutput] = {}
    async for output in stream:
        finals[output.request_id] = output
    return [finals[request_id] for request_id in stream.request_ids]


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Await ``work``, but cancel it (its requests get aborted) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        return Response(status_code=499)  # nginx's "client closed request": no one reads it
    return task.result()


async def collect_unless_disconnected(request: Request, stream: RequestStream) -> list[RequestOutput] | Response:
    """The stream's final outputs (``collect``), or a 499 if the client leaves first; either way
    the stream's requests are aborted once it returns (a no-op for those that finished)."""
    try:
        return await unless_disconnected(request, collect(stream))
    finally:
        stream.abort()


def event_stream(
    stream: RequestStream, chunks: AsyncIterator[BaseModel], typed_events: bool = False
) -> EventSourceResponse:
    """Send ``chunks`` as Server-Sent Events, then ``[DONE]``; an error after the response has
    started becomes an error event. The stream's requests are aborted when the client leaves.
    With ``typed_events`` (the Responses API) each event is named by its chunk's ``type`` and
    no ``[DONE]`` follows."""

    def format_chunk(chunk: BaseModel) -> bytes:
        name = getattr(chunk, "type", None) if typed_events else None
        return format_sse_event(event=name, data_str=chunk.model_dump_json())

    def format_error(status: int, message: str) -> bytes:
        return format_sse_event(
            event="error" if typed_events else None, data_str=error_body(status, message).model_dump_json()
        )

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield format_chunk(chunk)
        except EngineDeadError as exc:
            yield format_error(503, str(exc))
        except Exception:
            logger.exception("a streamed response failed")
            yield format_error(500, "internal server error")
        finally:
            stream.abort()
        if not typed_events:
            yield SSE_DONE

    # The background abort covers a client gone before the first event, when Starlette never
    # starts ``events()``.
    return EventSourceResponse(
        events(), headers={"Cache-Control": "no-cache"}, background=BackgroundTask(stream.abort)
    )
