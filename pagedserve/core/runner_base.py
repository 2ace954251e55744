"""What the engine needs from a model runner, and the plain data one step passes around: the
runner's interface (``ModelRunnerBase``), the step's output (``RunnerOutput``), the part every
tensor-parallel rank runs (``ForwardBatch``, ``ForwardResult``) and the forward's wall time
(``StepTimer``)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pagedserve.core.lora import LoRAManagerBase
from pagedserve.core.speculative import DraftTokens, ProposalBatch, Proposer

if TYPE_CHECKING:
    from pagedserve.core.request import Request
    from pagedserve.core.sampling import TokenLogprobs
    from pagedserve.core.schedule import SchedulerOutput


@dataclass
class RunnerOutput:
    """Per request id: the sampled token, its logprobs, and the prompt logprobs of this chunk
    (with the index, among the prompt's scored tokens 1.., of the chunk's first entry). A
    request that carried proposed tokens gets lists: the accepted proposals, then the token
    sampled after them, and their logprobs."""

    sampled_token_ids: dict[str, int | list[int]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs | list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    #: Per embedding request: the prompt position its chunk started at and the chunk's share of
    #: the pooled hidden state (see ``core/pooling.py``).
    pooled: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    #: Wall time of the model forward and the sampled rows' logits (the engine-overhead baseline).
    forward_seconds: float = 0.0


class StepTimer:
    """The wall time of a step's forward (and its sampled rows' logits), the engine-overhead
    baseline. On CUDA it is read from two events after the step's one device-to-host copy, so
    timing adds no synchronisation of its own."""

    def __init__(self, device: torch.device) -> None:
        self.events = None
        self.start = time.perf_counter()
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.seconds = 0.0

    def forward_done(self) -> None:
        if self.events is None:
            self.seconds = time.perf_counter() - self.start
        else:
            self.events[1].record()

    def forward_seconds(self) -> float:
        if self.events is None:
            return self.seconds
        self.events[1].synchronize()  # done already when the step copied sampled tokens back
        return self.events[0].elapsed_time(self.events[1]) / 1000



@dataclass
class ForwardBatch:
    """The part of a step every tensor-parallel rank runs, in plain lists (cheap to send): block
    copies, the forward, the logits of the sampled rows and of the prompt-logprobs rows."""

    token_ids: list[int] = field(default_factory=list)
    #: Per scheduled request: (block ids, first position, tokens this step).
    seqs: list[tuple[list[int], int, int]] = field(default_factory=list)
    #: The padded batch size of a decode-only step (None: the step runs eagerly).
    padded_size: int | None = None
    #: Rows whose logits the step samples or verifies, and rows that score prompt tokens.
    logits_rows: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ForwardResult:
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None


class ModelRunnerBase(ABC):
    """What the engine needs from a runner: its KV capacity and one ``execute`` per step."""

    num_kv_blocks: int
    vocab_size: int
    #: Installed by a LoRA plugin when the engine starts with ``enable_lora``.
    lora_manager: LoRAManagerBase | None = None
    #: The speculative-decoding proposer, when ``speculative_config`` is set.
    proposer: Proposer | None = None

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...

    def prepare_request(self, request: Request, tokenizer: Any) -> list[Future]:
        """Check a new request against the sampler's logits processors (ValueError) and start
        their preparation; the request waits for the returned futures."""
        return []

    def propose(self, batch: ProposalBatch) -> list[DraftTokens]:
        """Proposals for the next step (after ``execute`` and the scheduler's update)."""
        return [DraftTokens([]) for _ in batch.requests]

    def request_finished(self, request: Request) -> None:
        """A request finished or was aborted (the proposer drops what it kept for it)."""

    def check_health(self) -> None:
        """Raise when the runner can no longer run steps (a tensor-parallel worker died)."""

    def shutdown(self) -> None:
        """Release what the runner started (worker processes); called once, at engine shutdown."""
