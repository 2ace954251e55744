"""Speculative decoding's interfaces: what a proposer plugin implements and what it is given.

A proposer suggests, after each step, up to ``k`` tokens to follow each decoding request's
tokens. The scheduler schedules them as ordinary tokens (1 + k per request under the same
budget), the runner computes all of them in one target forward and the rejection sampler
(``core.rejection_sampler``) keeps the longest prefix the target agrees with, plus one token of
its own: the output is exactly what plain decoding gives (greedy) or follows the same
distribution (sampling).

Proposers are registered by method name with ``register_speculative_proposers`` and selected by
``speculative_config["method"]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from pagedserve.core.config import EngineConfig
    from pagedserve.core.request import Request


@dataclass
class DraftTokens:
    """One request's proposal: the tokens, and for a proposer that sampled them from its own
    distribution, that distribution [len(token_ids), vocab] (None: a point mass on each token,
    as an n-gram match is)."""

    token_ids: list[int]
    probs: torch.Tensor | None = None


@dataclass
class ProposalBatch:
    """The decoding requests to propose for, after a step, with how many tokens each may get.

    ``hidden_states`` (only for a proposer with ``uses_hidden_states``): per request id, the
    target's last-layer hidden state [hidden] at the position that produced the request's last
    token, the input an EAGLE- or MTP-style head drafts from.
    """

    requests: list[Request]
    max_num_tokens: list[int]
    hidden_states: dict[str, torch.Tensor] | None = None


class Proposer(ABC):
    """A speculative-decoding method. Built once by the model runner as
    ``cls(config, runner)``; ``runner`` gives ``device``, ``block_size``, ``backend`` (the
    attention backend), ``num_kv_blocks`` and ``vocab_size``."""

    #: Ask for the target's last hidden states in ``ProposalBatch.hidden_states``.
    uses_hidden_states: ClassVar[bool] = False
    #: The proposer writes KV of its own in the target's blocks past the scheduled tokens (a
    #: draft model): the scheduler keeps ``num_speculative_tokens`` extra slots for it.
    needs_lookahead_slots: ClassVar[bool] = False
    #: Above this many running sequences, speculation costs more than it saves (measured on
    #: the CPU with the bundled model, docs/speculative.md); 0: never switched off.
    default_disable_by_batch_size: ClassVar[int] = 0

    def __init__(self, config: EngineConfig, runner: Any) -> None:
        self.config = config
        assert config.speculative is not None
        self.num_speculative_tokens = config.speculative.num_speculative_tokens

    @abstractmethod
    def propose(self, batch: ProposalBatch) -> list[DraftTokens]:
        """One proposal per request of the batch, at most ``max_num_tokens[i]`` tokens (an
        empty one when nothing good comes to mind)."""

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of KV this proposer keeps per block of the target's cache (a draft model's)."""
        return 0

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate the proposer's own KV for ``num_blocks`` blocks (same ids as the target's)."""

    def request_finished(self, request: Request) -> None:
        """The request finished or was aborted: drop what is kept for it."""


@dataclass
class SpecDecodingStats:
    """One step's verification counts (vLLM's spec_decode_* counters)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    #: Index i: proposals accepted at position i of their draft.
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        per_pos = self.num_accepted_tokens_per_pos
        if len(per_pos) < num_draft_tokens:
            per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for position in range(num_accepted_tokens):
            per_pos[position] += 1


def disable_by_batch_size(config: EngineConfig, proposer_cls: type[Proposer]) -> int:
    """The most running sequences speculation runs at (``disable_by_batch_size``, else the
    proposer's measured default; 0: never off)."""
    assert config.speculative is not None
    limit = config.speculative.disable_by_batch_size
    return proposer_cls.default_disable_by_batch_size if limit is None else limit


def speculation_enabled_for(config: EngineConfig, proposer_cls: type[Proposer], num_running: int) -> bool:
    """Whether to propose at this batch size (``disable_by_batch_size``, 0 meaning never off)."""
    limit = disable_by_batch_size(config, proposer_cls)
    return limit == 0 or num_running <= limit
