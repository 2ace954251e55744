"""The torch path of batched LoRA (the CPU's, and the reference for the Triton kernels).

For each slot a step uses: gather its tokens, shrink (``x @ A.T``, to the slot's stacked rank),
expand (``@ B.T``, scaling folded into B) and add into the base output. One pair of matmuls per
slot and layer; tokens without an adapter are never touched.
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
    """``out[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T`` for every token t of slot s.

    ``lora_a``: [max_loras, R, in], ``lora_b``: [max_loras, out, R]; ``slots_in_use[s]`` is
    False when the adapter in slot s leaves this layer alone (it costs nothing then).
    """
    for slot, rows in mapping.groups:
        if not slots_in_use[slot]:
            continue
        if rows is None:
            out += (x @ lora_a[slot].T) @ lora_b[slot].T
        else:
            delta = (x.index_select(0, rows) @ lora_a[slot].T) @ lora_b[slot].T
            out.index_add_(0, rows, delta)
    return out
