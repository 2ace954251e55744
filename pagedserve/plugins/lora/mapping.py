"""One step's token -> LoRA slot mapping, built once a step by the manager."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class LoRAMapping:
    """Which slot each token of the flat batch uses (-1: none, the base model).

    ``groups`` serves the torch path: per slot in use, the tokens that use it (None: every
    token of the step), so one matmul per slot and layer, no Python loop over tokens.
    ``token_slots`` serves the Triton kernels, which read each token's slot themselves.
    """

    token_slots: torch.Tensor  # int32 [num_tokens]
    groups: list[tuple[int, torch.Tensor | None]]
    num_tokens: int
    _masks: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def column_mask(self, rank: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[num_tokens, width * rank]: 1 where column c belongs to the token's slot (c // rank),
        0 elsewhere and on every column of a token without a slot; built once a step per shape."""
        key = (rank, width, dtype)
        mask = self._masks.get(key)
        if mask is None:
            columns = torch.arange(width * rank, device=self.token_slots.device) // rank
            mask = (columns[None, :] == self.token_slots[:, None].long()).to(dtype)
            self._masks[key] = mask
        return mask

    @classmethod
    def build(
        cls, request_slots: Sequence[int], num_tokens: Sequence[int], device: torch.device
    ) -> LoRAMapping:
        slots = np.repeat(np.asarray(request_slots, dtype=np.int64), np.asarray(num_tokens, dtype=np.int64))
        groups: list[tuple[int, torch.Tensor | None]] = []
        for slot in np.unique(slots):
            if slot < 0:
                continue
            rows = np.nonzero(slots == slot)[0]
            index = None if rows.size == slots.size else torch.from_numpy(rows).to(device)
            groups.append((int(slot), index))
        token_slots = torch.from_numpy(slots.astype(np.int32)).to(device)
        return cls(token_slots=token_slots, groups=groups, num_tokens=int(slots.size))
