"""What one step of the scheduler decides (``SchedulerOutput``: each scheduled request and its
new tokens) and the builder that collects it under the step's token budget."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pagedserve.core.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    #: This step computes up to ``request.num_tokens``, so the runner samples one token; False
    #: for a non-final chunk of a chunked prefill.
    sample: bool
    #: Of ``num_new_tokens``, the last ones are these many proposed tokens
    #: (``request.spec_token_ids``): the runner samples ``1 + num_spec_tokens`` positions and
    #: verifies them.
    num_spec_tokens: int = 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    total_num_scheduled_tokens: int
    #: Copy-on-write block copies ``(src, dst)`` to do before the forward.
    blocks_to_copy: list[tuple[int, int]]
    #: Requests preempted (blocks freed, back to waiting) while building this step.
    preempted: list[Request]


class StepBuilder:
    """One step's schedule while it is being built: the entries, the token budget left."""

    def __init__(self, token_budget: int) -> None:
        self.entries: dict[str, ScheduledRequest] = {}
        self.budget = token_budget
        self.preempted: list[Request] = []

    def add(self, request: Request, num_new_tokens: int, num_spec_tokens: int = 0) -> None:
        sample = request.num_computed_tokens + num_new_tokens - num_spec_tokens == request.num_tokens
        self.entries[request.request_id] = ScheduledRequest(
            request, num_new_tokens, sample, num_spec_tokens
        )
        self.budget -= num_new_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()

    def unschedule(self, request: Request) -> None:
        entry = self.entries.pop(request.request_id, None)
        if entry is not None:
            self.budget += entry.num_new_tokens
