"""The default sampler, in vLLM v1's order.

1. logprobs, when any row asks, from the raw logits (before any processing);
2. the logits processors, in their registered order;
3. greedy rows: argmax of the processed logits;
4. other rows: temperature, top-k, top-p, min-p, then the exponential race (argmax of
   ``probs / q`` with ``q ~ Exponential(1)``), which draws exactly from ``probs`` without a
   cumulative sum. Seeded rows draw ``q`` from their request's own generator.
"""

from __future__ import annotations

import torch

from pagedserve.core.sampling import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    TokenLogprobs,
    argmax,
    device_to_host,
    host_to_device,
    logprob_tensors,
    request_generator,
)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top k, then outside the smallest set of
    most likely tokens whose probability reaches top_p. ``top_k`` 0 and ``top_p`` 1 disable."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    positions = torch.arange(logits.shape[-1], device=logits.device)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, logits.shape[-1])
        sorted_logits.masked_fill_(positions >= k.unsqueeze(1), float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # A row with top_p = 1 keeps everything, whatever the rounding of its cumulative sum.
        threshold = torch.where(top_p < 1.0, top_p, float("inf")).unsqueeze(1)
        outside = mass_before > threshold
        outside[:, 0] = False
        sorted_logits.masked_fill_(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Mask the tokens whose probability is below ``min_p`` times the row's largest one."""
    if min_p is None:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


class DefaultSampler(Sampler):
    """Greedy, temperature, top-k, top-p, min-p and seeded sampling, vectorised over rows."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        for processor in self.processors:
            logits = processor.apply(logits, batch)

        token_ids = argmax(logits)
        if not batch.all_greedy:
            sampled = self._sample(logits, batch)
            token_ids = torch.where(batch.greedy, token_ids, sampled)
        return self._to_host(raw_logprobs, token_ids, batch)

    def distributions(
        self, logits: torch.Tensor, batch: SamplingBatch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for processor in self.processors:
            logits = processor.apply(logits, batch)
        probs = None if batch.all_greedy else self._probs(logits, batch)
        return argmax(logits), probs

    @staticmethod
    def _probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution non-greedy rows draw from: temperature, top-k, top-p, min-p."""
        logits = logits / batch.temperatures
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        logits = apply_min_p(logits, batch.min_p)
        return logits.softmax(dim=-1)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        probs = self._probs(logits, batch)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row in batch.seeded_rows:
            noise[row].exponential_(generator=request_generator(batch.requests[row], self.device))
        # Some backends' exponential_ can return 0: keep the division finite.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return argmax(probs / noise)

    @staticmethod
    def _to_host(
        raw_logprobs: torch.Tensor | None, token_ids: torch.Tensor, batch: SamplingBatch
    ) -> SamplerOutput:
        """The sampled tokens, and the logprobs of the rows that asked, in one device-to-host
        copy: the step's only synchronisation with the device."""
        result: list[TokenLogprobs | None] = [None] * len(batch)
        if raw_logprobs is None:
            (tokens,) = device_to_host(token_ids)
            return SamplerOutput([int(t) for t in tokens], result)
        rows = [i for i, p in enumerate(batch.params) if p.logprobs is not None]
        index = host_to_device(rows, torch.int64, raw_logprobs.device)
        tensors = logprob_tensors(raw_logprobs[index], token_ids[index], [batch.params[i].logprobs for i in rows])
        tokens, *host = device_to_host(token_ids, *tensors.tensors())
        token_list = [int(t) for t in tokens]
        for row, entry in zip(rows, tensors.entries([token_list[i] for i in rows], host)):
            result[row] = entry
        return SamplerOutput(token_list, result)
