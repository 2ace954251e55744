"""The built-in logits processors: allowed token ids, bad words, per-request callables, logit
bias, min tokens and the repetition/frequency/presence penalties, with vLLM's (and OpenAI's)
meanings. Each touches only the rows that use it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from pagedserve.core.sampling import LogitsProcessor, SamplingBatch, host_to_device


def _cells(rows: list[int], tokens: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(row, token) pairs as an index for ``index_put_``."""
    return host_to_device(rows, torch.int64, device), host_to_device(tokens, torch.int64, device)


class LogitBiasProcessor(LogitsProcessor):
    """Adds ``logit_bias[token]`` to the token's logit (OpenAI's ``logit_bias``)."""

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows: list[int] = []
        tokens: list[int] = []
        biases: list[float] = []
        for row, params in enumerate(batch.params):
            for token, bias in (params.logit_bias or {}).items():
                rows.append(row)
                tokens.append(token)
                biases.append(bias)
        if rows:
            values = host_to_device(biases, logits.dtype, logits.device)
            logits.index_put_(_cells(rows, tokens, logits.device), values, accumulate=True)
        return logits


class MinTokensProcessor(LogitsProcessor):
    """While a request has fewer than ``min_tokens`` output tokens, forbid its stop tokens:
    ``stop_token_ids`` and, unless ``ignore_eos``, the model's EOS ids."""

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows: list[int] = []
        tokens: list[int] = []
        for row, (request, params) in enumerate(zip(batch.requests, batch.params)):
            if request.num_output_tokens >= params.min_tokens:
                continue
            stop_ids = set(params.stop_token_ids or [])
            if not params.ignore_eos:
                stop_ids.update(params.eos_token_ids)
            rows.extend([row] * len(stop_ids))
            tokens.extend(stop_ids)
        if rows:
            logits[_cells(rows, tokens, logits.device)] = float("-inf")
        return logits


class PenaltiesProcessor(LogitsProcessor):
    """Repetition penalty over prompt and output tokens (a positive logit is divided by it, a
    negative one multiplied), then frequency (times each token's output count) and presence
    (once per token present in the output) penalties subtracted."""

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows = [
            i
            for i, p in enumerate(batch.params)
            if (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) != (1.0, 0.0, 0.0)
        ]
        if not rows:
            return logits
        device = logits.device
        index = host_to_device(rows, torch.int64, device)
        params = [batch.params[i] for i in rows]
        penalties = [(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params]
        repetition, frequency, presence = host_to_device(penalties, torch.float32, device).T.unsqueeze(2)

        # One extra column absorbs the padding, then is dropped.
        width = self.vocab_size + 1
        output_ids = batch.output_token_ids(rows, pad=self.vocab_size)
        counts = torch.zeros(len(rows), width, dtype=logits.dtype, device=device)
        counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
        counts = counts[:, : self.vocab_size]
        prompt_ids = batch.prompt_token_ids(rows, pad=self.vocab_size)
        seen = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        seen.scatter_(1, prompt_ids, True)
        seen = seen[:, : self.vocab_size] | (counts > 0)

        selected = logits[index]
        penalised = torch.where(selected > 0, selected / repetition, selected * repetition)
        selected = torch.where(seen, penalised, selected)
        selected = selected - frequency * counts - presence * (counts > 0).to(logits.dtype)
        logits[index] = selected
        return logits


class AllowedTokenIdsProcessor(LogitsProcessor):
    """Rows with ``allowed_token_ids``: every other token is masked to -inf."""

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows = [i for i, p in enumerate(batch.params) if p.allowed_token_ids is not None]
        if not rows:
            return logits
        keep = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool, device=logits.device)
        positions = [position for position, row in enumerate(rows) for _ in batch.params[row].allowed_token_ids]
        allowed = [token for row in rows for token in batch.params[row].allowed_token_ids]
        keep[_cells(positions, allowed, logits.device)] = True
        index = host_to_device(rows, torch.int64, logits.device)
        logits[index] = logits[index].masked_fill(~keep, float("-inf"))
        return logits


class BadWordsProcessor(LogitsProcessor):
    """vLLM's ``bad_words``: a banned token sequence's last token is masked once the output
    ends with the tokens before it (a one-token word is masked always)."""

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows: list[int] = []
        tokens: list[int] = []
        for row, (request, params) in enumerate(zip(batch.requests, batch.params)):
            if not params.bad_words_token_ids:
                continue
            output = request.output_token_ids
            for word in params.bad_words_token_ids:
                prefix = len(word) - 1
                if prefix == 0 or (len(output) >= prefix and output[-prefix:] == word[:-1]):
                    rows.append(row)
                    tokens.append(word[-1])
        if rows:
            logits[_cells(rows, tokens, logits.device)] = float("-inf")
        return logits


def _takes_prompt(function: Callable[..., Any]) -> bool:
    """Whether a per-request processor has vLLM's three-argument form (prompt, output, logits)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


class PerRequestProcessor(LogitsProcessor):
    """vLLM's offline per-request ``logits_processors``: each callable gets the request's
    output token ids (and, with three parameters, its prompt ids first) and its logits row,
    and returns the row. Only the rows that have callables pay (one call per callable)."""

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        for row, (request, params) in enumerate(zip(batch.requests, batch.params)):
            for function in params.logits_processors or ():
                if _takes_prompt(function):
                    result = function(request.prompt_token_ids, request.output_token_ids, logits[row])
                else:
                    result = function(request.output_token_ids, logits[row])
                if result is not logits[row]:
                    logits[row] = result
        return logits
