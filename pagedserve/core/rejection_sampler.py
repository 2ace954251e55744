"""Verification of speculative tokens: the standard speculative-sampling rule.

A request that carried ``k`` proposed tokens ``d_1..d_k`` has ``k + 1`` rows of target logits:
row ``j`` scores the token after ``d_1..d_j``. Greedy requests keep the proposals up to the
first one that differs from the target's argmax, then take the argmax there (or after the last
proposal): exactly plain greedy decoding. Sampled requests accept ``d_j`` with probability
``min(1, p_j(d_j) / q_j(d_j))`` (``q`` the proposer's distribution; a point mass for n-gram and
suffix matches) and at the first rejection draw from the residual ``max(0, p_j - q_j)``
normalised, or after ``k`` acceptances from ``p_{k+1}``: each token then follows the target's
distribution ``p`` (Leviathan et al. 2023, Chen et al. 2023).

``p`` is what the sampler would draw from: every logits processor, temperature, top-k, top-p
and min-p applied, each row seeing the output extended by the proposals before it (so
penalties and min_tokens count them). Logprobs are the target's raw ones, as without
speculation. A seeded request draws its random numbers from its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.core.request import Request
from pagedserve.core.sampling import Sampler, SamplingBatch, TokenLogprobs, request_generator, token_logprobs


class DraftPosition:
    """A request as one verified row sees it: its output extended by the first ``num_drafts``
    proposals. Everything else is the request's own (``sampling_params``, ids, ...)."""

    def __init__(self, request: Request, num_drafts: int) -> None:
        self._request = request
        drafts = request.spec_token_ids[:num_drafts]
        self.output_token_ids = request.output_token_ids + drafts
        self.all_token_ids = request.all_token_ids + drafts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


@dataclass
class VerifiedTokens:
    """The accepted proposals then the target's own token, with their logprobs if asked."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None


def verify(
    sampler: Sampler, logits: torch.Tensor, requests: list[Request], device: torch.device
) -> list[VerifiedTokens]:
    """``logits`` [sum(k_i + 1), V]: each request's rows in order; its proposals are
    ``request.spec_token_ids`` (and ``spec_token_probs``)."""
    views = [DraftPosition(r, j) for r in requests for j in range(len(r.spec_token_ids) + 1)]
    batch = SamplingBatch(views, device=device)  # type: ignore[arg-type]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_num_logprobs is not None else None
    greedy_ids, probs = sampler.distributions(logits, batch)
    greedy_list = greedy_ids.tolist()

    results: list[VerifiedTokens] = []
    row = 0
    for request in requests:
        drafts = request.spec_token_ids
        k = len(drafts)
        if request.sampling_params.greedy:
            tokens = _greedy_chain(greedy_list[row : row + k + 1], drafts)
        else:
            assert probs is not None
            generator = (
                request_generator(request, device)
                if request.sampling_params.seed is not None
                else sampler.generator
            )
            tokens = sample_chain(probs[row : row + k + 1], drafts, request.spec_token_probs, generator)
        entry = VerifiedTokens(tokens)
        wanted = request.sampling_params.logprobs
        if raw_logprobs is not None and wanted is not None:
            chosen = torch.tensor(tokens, dtype=torch.long, device=raw_logprobs.device)
            entry.logprobs = token_logprobs(
                raw_logprobs[row : row + len(tokens)], chosen, [wanted] * len(tokens)
            )
        results.append(entry)
        row += k + 1
    return results


def _greedy_chain(target_ids: list[int], drafts: list[int]) -> list[int]:
    tokens = []
    for draft, target in zip(drafts, target_ids):
        tokens.append(target)
        if target != draft:
            return tokens
    tokens.append(target_ids[len(drafts)])
    return tokens


def sample_chain(
    p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, generator: torch.Generator
) -> list[int]:
    """One request's sampled verification. ``p`` [k + 1, V] the target's distributions, ``q``
    [k, V] the proposer's (None: a point mass on each proposal)."""
    k = len(drafts)
    num_accepted = k
    if k:
        draft_ids = torch.tensor(drafts, dtype=torch.long, device=p.device).unsqueeze(1)
        p_draft = p[:k].gather(1, draft_ids).squeeze(1)
        q_draft = torch.ones_like(p_draft) if q is None else q.to(p.device).gather(1, draft_ids).squeeze(1)
        uniform = torch.rand(k, generator=generator, device=p.device)
        accepted = (uniform * q_draft < p_draft).tolist()  # u < p / q, without dividing by q
        num_accepted = accepted.index(False) if False in accepted else k
    if num_accepted < k:
        if q is None:
            residual = p[num_accepted].clone()
            residual[drafts[num_accepted]] = 0.0
        else:
            residual = (p[num_accepted] - q[num_accepted].to(p.device)).clamp_min_(0.0)
        # A residual of no mass happens only through rounding (p == q never rejects).
        distribution = residual if residual.sum() > 0 else p[num_accepted]
    else:
        distribution = p[k]
    noise = torch.empty_like(distribution).exponential_(generator=generator)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    token = int((distribution / noise).argmax())
    return [*drafts[:num_accepted], token]
