"""Prompt lookup (vLLM's ``ngram`` method): the tokens that followed the last occurrence of the
request's final n-gram, searched in its own prompt and output. No model, no memory."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagedserve.core.config import EngineConfig
from pagedserve.core.speculative import DraftTokens, ProposalBatch, Proposer


def find_ngram_continuation(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The up to ``k`` tokens after the latest earlier occurrence of the longest final n-gram
    (``max_n`` down to ``min_n``) of ``tokens``; [] when none recurs."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting before length - n: each is followed by at least one token.
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer(Proposer):
    """Proposes by matching the request's last ``prompt_lookup_max`` .. ``prompt_lookup_min``
    tokens earlier in the same request."""

    #: Measured on the CPU with the bundled model (docs/speculative.md: 1.21x at batch 4,
    #: 0.87x at 6): past this batch size the verification rows cost more than the accepted
    #: tokens save.
    default_disable_by_batch_size = 4

    def __init__(self, config: EngineConfig, runner: Any) -> None:
        super().__init__(config, runner)
        spec = config.speculative
        assert spec is not None and spec.prompt_lookup_min and spec.prompt_lookup_max
        self.min_n = spec.prompt_lookup_min
        self.max_n = spec.prompt_lookup_max

    def propose(self, batch: ProposalBatch) -> list[DraftTokens]:
        proposals = []
        for request, k in zip(batch.requests, batch.max_num_tokens):
            tokens = np.asarray(request.all_token_ids, dtype=np.int64)
            proposals.append(DraftTokens(find_ngram_continuation(tokens, self.min_n, self.max_n, k)))
        return proposals
