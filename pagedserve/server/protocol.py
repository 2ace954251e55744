"""Request and response bodies of the OpenAI API, with vLLM's extra sampling fields.

Field names and defaults follow OpenAI's API reference and vLLM's ``protocol.py``. Unknown
request fields are ignored, as both do. Request bodies are validated strictly (``RequestModel``):
no coercion (``"2"`` is not an integer, ``1`` not a boolean), no infinite or NaN numbers.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from pagedserve.core.beam_search import BeamSearchParams
from pagedserve.core.sampling_params import (
    GENERATION_CONFIG_FIELDS,
    MAX_LOGPROBS,
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
)

TokenId = Annotated[int, Field(strict=True, ge=0)]
#: Above this the distribution is as good as uniform; vLLM has no bound, OpenAI's is 2.
MAX_TEMPERATURE = 100.0


class RequestModel(BaseModel):
    """A request body (or a part of one): strict types, finite numbers."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    """``response_format.json_schema``: OpenAI's ``{"name", "description", "schema", "strict"}``."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(default="schema", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(RequestModel):
    """The fields completions and chat completions share."""

    model: str | None = None
    n: int | None = Field(default=1, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    # Structured output (server/structured.py): OpenAI's response_format, vLLM's extras.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    #: vLLM's options for plugins (custom logits processors): the engine's ``extra_args``.
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    # vLLM's beam search extras: n beams; early_stopping as transformers' (and vLLM 0.6's).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def num_seqs_per_prompt(self) -> int:
        """The engine sequences each prompt takes: ``n``, or ``best_of`` when it asks for more."""
        return max(self.num_choices, getattr(self, "best_of", None) or 0)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None,
        defaults: dict[str, Any],
        structured_outputs: StructuredOutputsParams | None = None,
        **extra: Any,
    ) -> SamplingParams:
        """The engine's SamplingParams; fields the request leaves out take the model's
        generation_config defaults, then OpenAI's. ValueError for an invalid value."""
        given = {name: getattr(self, name) for name in GENERATION_CONFIG_FIELDS}
        sampling = {name: value for name, value in given.items() if value is not None}
        return SamplingParams(
            **{**defaults, **sampling},
            n=self.num_choices,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=structured_outputs,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            bad_words=self.bad_words,
            allowed_token_ids=self.allowed_token_ids,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            # Streams send what is new each step; a plain response needs only the end.
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            extra_args=dict(self.vllm_xargs) if self.vllm_xargs is not None else None,
            **extra,
        )


    def to_beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        """``use_beam_search``: ``n`` beams, the best ``n`` returned. ValueError when invalid."""
        return BeamSearchParams(
            beam_width=self.num_choices,
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            temperature=self.temperature or 0.0,
            length_penalty=self.length_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output,
            early_stopping=self.early_stopping,
        )


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        """Nothing to generate from (vLLM would start from BOS alone): a 400."""
        parts = [prompt] if isinstance(prompt, str) else prompt
        if not parts or any(not isinstance(part, int) and len(part) == 0 for part in parts):
            raise ValueError("the prompt is empty: give a non-empty string or token ids")
        return prompt


class ContentPart(RequestModel):
    """A part of a message's content; only ``text`` parts are supported."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str = ""


class FunctionCall(RequestModel):
    name: str
    arguments: str


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(RequestModel):
    id: str = Field(default_factory=new_tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


@dataclass(frozen=True)
class MessageRule:
    """What a message of one role must carry (OpenAI's rules)."""

    #: Content is required (None is refused; an empty string is content).
    content: bool = True
    #: Other fields it must have.
    required: tuple[str, ...] = ()
    #: Fields that stand in for content when content is not required.
    content_or: tuple[str, ...] = ()


#: The roles a message may have and what each needs; any other role is a 400.
MESSAGE_RULES: dict[str, MessageRule] = {
    "system": MessageRule(),
    "developer": MessageRule(),
    "user": MessageRule(),
    "assistant": MessageRule(content=False, content_or=("tool_calls",)),
    "tool": MessageRule(required=("tool_call_id",)),
    "function": MessageRule(required=("name",)),  # OpenAI's deprecated form of tool
}


class ChatMessage(RequestModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    #: An assistant's earlier calls, and a tool message's answer to one of them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _follows_its_role(self) -> ChatMessage:
        rule = MESSAGE_RULES.get(self.role)
        if rule is None:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(MESSAGE_RULES)}")
        missing = [name for name in rule.required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.role} message needs {' and '.join(missing)}")
        if self.content is None:
            if rule.content:
                raise ValueError(f"a {self.role} message needs content")
            if not any(getattr(self, name) for name in rule.content_or):
                fields = " or ".join(("content", *rule.content_or))
                raise ValueError(f"a {self.role} message needs {fields}")
        return self


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionTool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatTemplateRequest(RequestModel):
    """The fields of a request that renders messages through the chat template (chat
    completions and ``/tokenize``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    # vLLM's extras
    add_generation_prompt: bool = True
    #: A template instead of the model's: only with ``--trust-request-chat-template``.
    chat_template: str | None = None
    #: Extra template variables; never rendering arguments (``tokenize``, ...).
    chat_template_kwargs: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingRequest, ChatTemplateRequest):
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatCompletionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True


# -- responses ----------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob`` as its ``prompt_logprobs`` extra shows it."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: Per prompt token (None for the first): token id (as a string key) -> its logprob.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _without_none(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaToolCall(BaseModel):
    """A streamed piece of a call: the first has its id, type and name, later ones arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _without_none(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaMessage(BaseModel):
    """A streamed piece of the assistant message: OpenAI sends only the keys it has."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_none(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# -- the other endpoints ---------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pagedserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(ChatTemplateRequest):
    model: str | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
