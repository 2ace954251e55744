"""pagedserve: a plugin-based LLM inference engine with a paged KV cache.

Kept light on purpose: ``LLM`` and ``SamplingParams`` are imported on first use, so that loading
plugins and ``pagedserve --help`` never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedserve.core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "BeamSearchParams",
    "LoRARequest",
    "PoolingParams",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
    "hookimpl",
    "__version__",
]

if TYPE_CHECKING:
    from pagedserve.core.beam_search import BeamSearchParams
    from pagedserve.core.llm import LLM
    from pagedserve.core.lora import LoRARequest
    from pagedserve.core.pooling import PoolingParams
    from pagedserve.core.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from pagedserve.core.llm import LLM

        return LLM
    if name == "LoRARequest":
        from pagedserve.core.lora import LoRARequest

        return LoRARequest
    if name == "PoolingParams":
        from pagedserve.core.pooling import PoolingParams

        return PoolingParams
    if name == "BeamSearchParams":
        from pagedserve.core.beam_search import BeamSearchParams

        return BeamSearchParams
    if name in ("SamplingParams", "StructuredOutputsParams", "RequestOutputKind"):
        from pagedserve.core import sampling_params

        return getattr(sampling_params, name)
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
