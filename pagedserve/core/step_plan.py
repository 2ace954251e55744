"""Where each scheduled request's tokens go in a step's flat batch, and which rows of the
forward's output the runner samples, verifies, scores as prompt logprobs or pools: built on the
host from the scheduler's output, once a step, before the forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.core.request import Request
    from pagedserve.core.schedule import ScheduledRequest


@dataclass
class StepPlan:
    token_ids: list[int] = field(default_factory=list)
    #: Per scheduled request: (block ids, first position, tokens this step).
    seqs: list[tuple[list[int], int, int]] = field(default_factory=list)
    #: Requests sampling one token (no proposals to verify, not embeddings), and their rows.
    sample_requests: list[Request] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    #: Requests verifying proposals, and their 1 + k rows each (after ``sample_rows``).
    spec_requests: list[Request] = field(default_factory=list)
    spec_rows: list[int] = field(default_factory=list)
    #: (request id, start, first row, targets, k): logits at position p score prompt token p + 1.
    prompt_rows: list[tuple[str, int, int, list[int], int]] = field(default_factory=list)
    #: (request id, start, first row, rows, last chunk) of embedding requests: pooled, not sampled.
    pool_rows: list[tuple[str, int, int, int, bool]] = field(default_factory=list)

    @property
    def prompt_logits_rows(self) -> list[int]:
        """Every row whose logits score a prompt token, in ``prompt_rows`` order."""
        return [row for _, _, first, targets, _ in self.prompt_rows for row in range(first, first + len(targets))]


def plan_step(scheduled: list[ScheduledRequest]) -> StepPlan:
    """The flat batch and its rows for ``scheduled``, in batch order."""
    plan = StepPlan()
    token_ids = plan.token_ids
    for item in scheduled:
        req, start, count = item.request, item.request.num_computed_tokens, item.num_new_tokens
        first = len(token_ids)
        num_spec = item.num_spec_tokens
        token_ids.extend(req.all_token_ids[start : start + count - num_spec])
        token_ids.extend(req.spec_token_ids[:num_spec])
        plan.seqs.append((req.block_ids, start, count))
        if req.pooling_params is not None:
            plan.pool_rows.append((req.request_id, start, first, count, item.sample))
            continue
        if item.sample and num_spec:
            plan.spec_requests.append(req)
            plan.spec_rows.extend(range(first + count - 1 - num_spec, first + count))
        elif item.sample:
            plan.sample_requests.append(req)
            plan.sample_rows.append(first + count - 1)
        k = req.sampling_params.prompt_logprobs
        if k is not None and start < req.num_prompt_tokens - 1:
            end = min(start + count, req.num_prompt_tokens - 1)
            targets = req.prompt_token_ids[start + 1 : end + 1]
            plan.prompt_rows.append((req.request_id, start, first, targets, k))
    return plan
