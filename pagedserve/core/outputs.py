"""What the engine hands back: vLLM's RequestOutput / CompletionOutput shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request."""

    index: int
    text: str
    token_ids: list[int]
    #: The text not returned in this request's previous outputs (for streaming). An end that
    #: may yet become a stop string is held back until it is settled.
    delta_text: str = ""
    cumulative_logprob: float | None = None
    #: Per generated token, ``{token_id: Logprob}`` (when ``logprobs`` was asked for).
    logprobs: list[dict[int, Any]] | None = None
    finish_reason: str | None = None
    #: The stop string or stop token id that ended it, else None.
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one user request after an engine step (cumulative, not a delta)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    num_cached_tokens: int = 0
    #: ``time.monotonic()`` timestamps: arrival_time, first_scheduled_time, first_token_time and,
    #: once finished, finished_time (those known so far).
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """The embedding of one prompt (vLLM's shape): ``output.outputs.embedding``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
