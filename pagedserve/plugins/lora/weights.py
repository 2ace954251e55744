"""What a LoRA format loader hands the manager: per target module, A, B and the scaling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class LoRAModuleWeights:
    """One adapted linear module (HF name): ``delta = scaling * (x @ lora_a.T) @ lora_b.T``."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class LoRAAdapterWeights:
    """A loaded adapter: its modules by HF module name (``model.layers.0.self_attn.q_proj``)."""

    path: str
    modules: dict[str, LoRAModuleWeights] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


class LoRAFormat(Protocol):
    """A ``register_lora_formats`` target: recognises and loads one kind of adapter folder."""

    @staticmethod
    def matches(path: str) -> bool:
        """True when the folder is in this format (the manager tries formats by priority)."""

    @staticmethod
    def load(path: str, max_lora_rank: int) -> LoRAAdapterWeights:
        """Read the adapter on the CPU; ValueError naming the field it cannot serve."""
