"""The torch path of batched LoRA (the CPU's, and the reference for the Triton kernels).

A step with one adapter: gather its tokens (all of them: no gather), shrink (``x @ A.T``, to the
slot's stacked rank), expand (``@ B``, scaling folded into B), add into the base output.

A step with several: one shrink against every slot in use at once (``x @ [A_0; A_1; ...].T``),
a mask keeping each token's own slot's columns, and one expand: three ops a layer whatever the
number of adapters (against four a slot), for a shrink and expand as wide as the slots in use.
Tokens without an adapter get exact zeros.
"""

from __future__ import annotations

import torch

from pagedserve.plugins.lora.mapping import LoRAMapping


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    mapping: LoRAMapping,
    slots_in_use: list[bool],
) -> torch.Tensor:
    """``out[t] += (x[t] @ lora_a[s].T) @ lora_b[s]`` for every token t of slot s.

    ``lora_a``: [max_loras, R, in], ``lora_b``: [max_loras, R, out]; ``slots_in_use[s]`` is
    False when the adapter in slot s leaves this layer alone (it costs nothing then).
    """
    groups = [(slot, rows) for slot, rows in mapping.groups if slots_in_use[slot]]
    if len(groups) > 1:
        width = max(slot for slot, _ in groups) + 1
        rank = lora_a.shape[1]
        y = x @ lora_a[:width].reshape(width * rank, -1).T
        y *= mapping.column_mask(rank, width, y.dtype)
        return out.addmm_(y, lora_b[:width].reshape(width * rank, -1))
    for slot, rows in groups:
        if rows is None:
            out += (x @ lora_a[slot].T) @ lora_b[slot]
        else:
            delta = (x.index_select(0, rows) @ lora_a[slot].T) @ lora_b[slot]
            out.index_add_(0, rows, delta)
    return out
