"""The built-in sampler and logits processors, registered like any third-party plugin's.

Importing this module must not import torch: targets are lazy ``"module:attr"`` strings.
"""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl

_PROCESSORS = "pagedserve.plugins.samplers.processors"


@hookimpl
def register_samplers(register: Register) -> None:
    register("default", "pagedserve.plugins.samplers.default:DefaultSampler")


@hookimpl
def register_logits_processors(register: Register) -> None:
    # vLLM v1's order: the allowed-token and bad-word masks, then (as vLLM's offline
    # per-request processors did) the request's own callables, bias and min-tokens masking,
    # penalties on the result.
    register("allowed_token_ids", f"{_PROCESSORS}:AllowedTokenIdsProcessor", order=1)
    register("bad_words", f"{_PROCESSORS}:BadWordsProcessor", order=2)
    register("per_request", f"{_PROCESSORS}:PerRequestProcessor", order=5)
    register("logit_bias", f"{_PROCESSORS}:LogitBiasProcessor", order=10)
    register("min_tokens", f"{_PROCESSORS}:MinTokensProcessor", order=20)
    register("penalties", f"{_PROCESSORS}:PenaltiesProcessor", order=30)
