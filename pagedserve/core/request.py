"""Request: one sequence being generated, as the scheduler and the KV-cache manager see it."""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from typing import Any

from pagedserve.core.lora import LoRARequest
from pagedserve.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    #: A sibling of an ``n > 1`` request, waiting for its leader's prompt to be computed.
    WAITING_FOR_FORK = "waiting_for_fork"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class Request:
    """The state of one sequence: its tokens, how many have KV, and (written by the KV-cache
    manager alone) the ids of the blocks holding that KV.

    A user request with ``n > 1`` becomes ``n`` sequences: the first (the leader) prefills the
    prompt, the others fork from it and share its blocks copy-on-write.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: Any = None,
        parent_id: str | None = None,
        index: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        #: A tenant salt mixed into every block hash.
        self.cache_salt = cache_salt
        #: The adapter this sequence runs with (None: the base model).
        self.lora_request = lora_request
        #: Extra keys of every block hash: the salt, and the adapter if any.
        self.block_hash_extra_keys: Any = (
            cache_salt if lora_request is None else (cache_salt, lora_request.cache_key)
        )
        #: The user-visible request this sequence belongs to, and its index among the n.
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        #: Sequences that fork from this one once its prompt is computed (all but the last token).
        self.fork_children: list[Request] = []
        self.fork_leader: Request | None = None

        #: The scheduler does not append this sequence's sampled tokens: its group picks the next
        #: tokens of all its sequences together (beam search) from their logprobs.
        self.group_chooses_tokens = False
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_ids: list[int] = []
        #: Hashes of this request's full blocks, extended by the KV-cache manager.
        self.block_hashes: list[bytes] = []
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        #: Work that must finish before the request is first scheduled (a grammar compiling off
        #: the engine loop, ...): until then it waits and the others run.
        self.pending: list[Future] = []
        #: An embedding request (prefill only): its options; the runner pools its hidden
        #: states into ``pooled`` instead of sampling, and it finishes once its prompt is computed.
        self.pooling_params: Any = None
        self.pooled: Any = None
        #: Compute every prompt token, reading nothing from the prefix cache (prompt logprobs
        #: and MEAN pooling need them all).
        self.skip_reading_prefix_cache = sampling_params.prompt_logprobs is not None
        #: Sampling results kept for the output: per output token, (logprob, rank, top dict).
        self.logprobs: list[Any] = []
        self.prompt_logprobs: list[Any] = []
        self.cumulative_logprob = 0.0
        #: Speculative decoding: the tokens proposed for the next step (after the last token)
        #: and, for a proposer that samples them, their draft probabilities [k, vocab] (None:
        #: each proposed token had probability 1). Written by the engine, cut by the scheduler.
        self.spec_token_ids: list[int] = []
        self.spec_token_probs: Any = None
        #: Verification steps with proposals, proposed tokens verified, and tokens accepted.
        self.num_spec_drafts = 0
        self.num_spec_draft_tokens = 0
        self.num_spec_accepted_tokens = 0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    # -- sizes -------------------------------------------------------------------------------

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    @property
    def ready(self) -> bool:
        """No pending work is left (what has failed counts as done: its owner reports it)."""
        self.pending = [future for future in self.pending if not future.done()]
        return not self.pending

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    @property
    def fork_point(self) -> int:
        """Tokens the leader computes before its siblings fork: all of the prompt but the last
        token, so each sibling computes that token itself and samples its own first token."""
        return self.num_prompt_tokens - 1

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop the output tokens past ``num_output_tokens`` (a stop string ended the output
        inside a step's accepted speculative tokens)."""
        extra = self.num_output_tokens - num_output_tokens
        if extra > 0:
            dropped = zip(self.output_token_ids[num_output_tokens:], self.logprobs[num_output_tokens:])
            self.cumulative_logprob -= sum(entry[token].logprob for token, entry in dropped)
            del self.output_token_ids[num_output_tokens:]
            del self.all_token_ids[-extra:]
            del self.logprobs[num_output_tokens:]

    def set_spec_tokens(self, token_ids: list[int], probs: Any = None) -> None:
        self.spec_token_ids = token_ids
        self.spec_token_probs = probs

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_ids})"
        )


def link_forks(sequences: list[Request]) -> Request:
    """Make the first sequence the leader the others fork from once it computed the prompt
    (``n > 1``, ``best_of``, beam search); returns the leader, the one to schedule."""
    leader, siblings = sequences[0], sequences[1:]
    leader.fork_children = siblings
    for sibling in siblings:
        sibling.fork_leader = leader
        sibling.status = RequestStatus.WAITING_FOR_FORK
        sibling.arrival_time = leader.arrival_time
    return leader
