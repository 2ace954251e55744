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
    # vLLM v1's order: bias and min-tokens masking first, penalties on the result.
    register("logit_bias", f"{_PROCESSORS}:LogitBiasProcessor", order=10)
    register("min_tokens", f"{_PROCESSORS}:MinTokensProcessor", order=20)
    register("penalties", f"{_PROCESSORS}:PenaltiesProcessor", order=30)
