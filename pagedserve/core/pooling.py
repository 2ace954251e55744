"""Embeddings of the served model: the last hidden state (after the final norm) pooled over a
prompt, with vLLM's names (``PoolerConfig``, ``PoolingParams``, pooling types ``LAST`` and
``MEAN``).

An embedding request is a prefill-only request: it is scheduled like any other (chunked, in
the same steps as generation, in its own KV blocks), the runner pools each chunk's hidden
rows instead of sampling, and the request finishes, freeing its blocks, when the prompt is
computed. MEAN needs every prompt position, so it reads nothing from the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config imports this module: no torch import for ``--help``
    import torch

POOLING_TYPES = ("LAST", "MEAN")


@dataclass
class PoolerConfig:
    """How the engine pools (vLLM's ``--pooler-config``): ``pooling_type`` LAST (the last
    prompt token, vLLM's default for decoder models) or MEAN, and whether embeddings are
    L2-normalised unless a request says otherwise."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type {self.pooling_type!r} is not supported; use one of {', '.join(POOLING_TYPES)}"
            )
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")

    @classmethod
    def of(cls, value: PoolerConfig | dict[str, Any] | None) -> PoolerConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"pooler_config must be a dict such as {{'pooling_type': 'MEAN'}}, got {value!r}")
        unknown = set(value) - {"pooling_type", "normalize"}
        if unknown:
            raise ValueError(f"pooler_config fields {sorted(unknown)} are not supported (pooling_type, normalize)")
        return cls(**value)


@dataclass
class PoolingParams:
    """One embedding request's options (vLLM's): ``normalize`` (None: the engine's) and
    ``dimensions`` (only the model's own size: it was not trained for shorter ones)."""

    normalize: bool | None = None
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true, false or None, got {self.normalize!r}")
        if self.dimensions is not None and (
            not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool) or self.dimensions < 1
        ):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")

    def check(self, hidden_size: int) -> None:
        """ValueError for what the model cannot give."""
        if self.dimensions is not None and self.dimensions != hidden_size:
            raise ValueError(
                f"dimensions={self.dimensions} is not supported: the model does not support "
                f"matryoshka representations; its embeddings have {hidden_size} dimensions"
            )


def pool_chunk(pooling_type: str, hidden: torch.Tensor, is_last_chunk: bool) -> torch.Tensor | None:
    """A chunk's share of the pooled state, in float32: the sum of its rows (MEAN), or its last
    row once the prompt is complete (LAST); None when the chunk adds nothing."""
    if pooling_type == "MEAN":
        return hidden.float().sum(dim=0)
    return hidden[-1].float() if is_last_chunk else None


def combine(pooling_type: str, state: torch.Tensor | None, start: int, partial: torch.Tensor) -> torch.Tensor:
    """The pooled state after a chunk that started at prompt position ``start`` (a chunk at 0
    starts over, as after a preemption)."""
    if pooling_type == "MEAN" and state is not None and start > 0:
        return state + partial
    return partial


def finish(pooling_type: str, state: torch.Tensor, num_tokens: int, normalize: bool) -> list[float]:
    import torch

    pooled = state / num_tokens if pooling_type == "MEAN" else state
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled.tolist()
