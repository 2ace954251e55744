"""A per-request option: ``extra_args={"banned_token_ids": [...]}`` (over HTTP, vLLM's
``vllm_xargs``) keeps those tokens from ever being sampled for that request."""

from __future__ import annotations

from typing import Any

import torch

from pagedserve.core.request import Request
from pagedserve.core.sampling import LogitsProcessor, SamplingBatch

OPTION = "banned_token_ids"


def banned_ids(extra_args: dict[str, Any] | None) -> list[int] | None:
    return (extra_args or {}).get(OPTION)


class BannedTokensProcessor(LogitsProcessor):
    """Built once per engine as ``BannedTokensProcessor(vocab_size, device)``."""

    def prepare_request(self, request: Request, tokenizer: Any) -> None:
        """Runs when a request is added: a bad option is refused (a 400 over HTTP) before it runs."""
        ids = banned_ids(request.sampling_params.extra_args)
        if ids is None:
            return None
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids
        ):
            raise ValueError(f"{OPTION} must be a list of token ids in [0, {self.vocab_size}), got {ids!r}")
        return None

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Row i of ``logits`` [rows, vocab] belongs to ``batch.params[i]``; rows without the
        option are left as they are (the usual case costs one dict lookup a row)."""
        for row, params in enumerate(batch.params):
            ids = banned_ids(params.extra_args)
            if ids:
                logits[row, ids] = float("-inf")
        return logits
