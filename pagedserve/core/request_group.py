"""One user request as the engine tracks it: its prompt, its sequences (``n``, or ``best_of``),
their detokenizers, and the ``RequestOutput`` it reports after a step in its ``output_kind``.

CUMULATIVE copies every token id so far into each output (O(length) a step); DELTA reports only
what is new since the previous output and FINAL_ONLY one output at the end, so a running
request's step costs O(new tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedserve.core import pooling
from pagedserve.core.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from pagedserve.core.pooling import PoolingParams
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.core.tokenizer import IncrementalDetokenizer


@dataclass
class RequestGroup:
    """One user request: its prompt and its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    #: The parameters as the user gave them (the sequences may run with more logprobs);
    #: PoolingParams for an embedding request (one sequence, no detokenizer).
    params: SamplingParams | PoolingParams
    #: Per sequence: output tokens already reported (DELTA).
    sent: list[int] = field(default_factory=list)
    #: Whether an output was reported (prompt logprobs go in the first one only, in DELTA).
    reported: bool = False
    #: The engine's PoolerConfig, for an embedding request.
    pooler: Any = None

    def __post_init__(self) -> None:
        self.sent = [0] * len(self.sequences)

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)

    @property
    def selects_best(self) -> bool:
        """best_of > n: the n best sequences are chosen, so only the final output is reported."""
        return len(self.sequences) > self.params.n

    def make_output(self, *, force: bool = False) -> RequestOutput | EmbeddingRequestOutput | None:
        """The output to report now, or None when its kind reports nothing this step
        (FINAL_ONLY or best_of > n while running); ``force`` reports anyway (an abort)."""
        params = self.params
        if isinstance(params, PoolingParams):
            return self._embedding_output(params)
        finished = self.finished
        kind = params.output_kind
        if not finished and not force and (kind is RequestOutputKind.FINAL_ONLY or self.selects_best):
            return None
        delta = kind is RequestOutputKind.DELTA and not self.selects_best
        completions = [self._completion(i, delta) for i in range(len(self.sequences))]
        if self.selects_best:
            completions.sort(key=lambda c: c.cumulative_logprob, reverse=True)
            completions = completions[: params.n]
            for index, completion in enumerate(completions):
                completion.index = index
        leader = self.sequences[0]
        prompt_logprobs = None
        if params.prompt_logprobs is not None and not (delta and self.reported):
            prompt_logprobs = [None, *leader.prompt_logprobs]
        self.reported = True
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=leader.num_cached_tokens,
            metrics=self._timings(),
        )

    def _completion(self, i: int, delta: bool) -> CompletionOutput:
        seq, detok = self.sequences[i], self.detokenizers[i]
        delta_text = detok.flush() if seq.is_finished else detok.get_delta()
        logprobs = seq.logprobs if self.params.logprobs is not None else None
        if delta:
            start, self.sent[i] = self.sent[i], seq.num_output_tokens
            token_ids = seq.output_token_ids[start:]
            logprobs = logprobs[start:] if logprobs is not None else None
            text = delta_text
        else:
            token_ids = list(seq.output_token_ids)
            text = detok.text
        track_logprob = seq.sampling_params.logprobs is not None
        return CompletionOutput(
            index=seq.index,
            text=text,
            delta_text=delta_text,
            token_ids=token_ids,
            cumulative_logprob=seq.cumulative_logprob if track_logprob else None,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def _embedding_output(self, params: PoolingParams) -> EmbeddingRequestOutput:
        (seq,) = self.sequences
        embedding: list[float] = []  # aborted before its prompt was computed
        if seq.status is RequestStatus.FINISHED_STOPPED and seq.pooled is not None:
            normalize = self.pooler.normalize if params.normalize is None else params.normalize
            embedding = pooling.finish(self.pooler.pooling_type, seq.pooled, seq.num_prompt_tokens, normalize)
        return EmbeddingRequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=EmbeddingOutput(embedding),
            finished=self.finished,
            num_cached_tokens=seq.num_cached_tokens,
            metrics=self._timings(),
        )

    def _timings(self) -> dict[str, float]:
        """The request's ``time.monotonic()`` timestamps known so far (vLLM's RequestMetrics)."""
        leader = self.sequences[0]
        first_tokens = [s.first_token_time for s in self.sequences if s.first_token_time is not None]
        timings = {
            "arrival_time": leader.arrival_time,
            "first_scheduled_time": leader.first_scheduled_time,
            "first_token_time": min(first_tokens, default=None),
            "finished_time": time.monotonic() if self.finished else None,
        }
        metrics = {name: value for name, value in timings.items() if value is not None}
        drafts = sum(s.num_spec_drafts for s in self.sequences)
        if drafts:
            # Speculative decoding: verification steps, proposed and accepted tokens; the mean
            # accepted length counts the target's own token of each step too.
            proposed = sum(s.num_spec_draft_tokens for s in self.sequences)
            accepted = sum(s.num_spec_accepted_tokens for s in self.sequences)
            metrics["spec_num_drafts"] = drafts
            metrics["spec_num_draft_tokens"] = proposed
            metrics["spec_num_accepted_tokens"] = accepted
            metrics["spec_acceptance_rate"] = accepted / proposed if proposed else 0.0
            metrics["spec_mean_accepted_length"] = 1 + accepted / drafts
        return metrics
