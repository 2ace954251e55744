"""``--sampler argmax``: every request decodes greedily, whatever its temperature (a
deterministic server). Logprobs, when asked, come from the raw logits as the default sampler's."""

from __future__ import annotations

import torch

from pagedserve.core.sampling import Sampler, SamplerOutput, SamplingBatch, token_logprobs


class ArgmaxSampler(Sampler):
    """Built once per engine as ``ArgmaxSampler(vocab_size, device, processors, seed)``."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        raw = torch.log_softmax(logits, dim=-1) if batch.max_num_logprobs is not None else None
        for processor in self.processors:  # every registered logits processor, in order
            logits = processor.apply(logits, batch)
        token_ids = logits.argmax(dim=-1)
        logprobs: list = [None] * len(batch)
        if raw is not None:
            rows = [i for i, p in enumerate(batch.params) if p.logprobs is not None]
            found = token_logprobs(raw[rows], token_ids[rows], [batch.params[i].logprobs for i in rows])
            for i, entry in zip(rows, found):
                logprobs[i] = entry
        return SamplerOutput(token_ids.tolist(), logprobs)
