"""HF checkpoint names -> the decoder's parameters, shard by shard, with nothing left unloaded.

A checkpoint can store a merged layer as separate tensors (Llama's ``q_proj``/``k_proj``/``v_proj``,
loaded as shards of our ``qkv_proj``), as one fused tensor (Phi-3's ``qkv_proj``, cut into the
same shards by ``Linear.load_fused``), and experts one by one (``experts.3.gate_proj``, loaded
into expert 3 of the fused ``FusedMoE``). Every path ends in a layer's ``weight_loader``, which
the quant method can take over, so no format is named here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedserve.core.layers.linear import Linear
from pagedserve.plugins.moe import FusedMoE

#: HF weight name part -> (our merged layer's name part, shard index).
MERGED_WEIGHTS: dict[str, tuple[str, int]] = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}
_EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<kind>\w+)$")


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    renames: Iterable[tuple[str, str]] = (),
    expert_weights: dict[str, tuple[str, int | None]] | None = None,
) -> None:
    """Load HF-named tensors into ``model``; raises on a tensor it has no place for, and on any
    parameter (or shard of one) the checkpoint did not provide."""
    params = dict(model.named_parameters())
    lm_head = getattr(model, "lm_head", None)
    tied = bool(getattr(lm_head, "tied", False))
    loaded: dict[str, set[Any]] = {}
    for hf_name, tensor in weights:
        if "rotary_emb." in hf_name or (tied and hf_name.startswith("lm_head.")):
            continue
        name = hf_name
        for old, new in renames:
            name = name.replace(old, new)
        try:
            name, shards = _load_one(model, params, name, tensor, expert_weights or {})
        except KeyError:
            raise ValueError(
                f"the checkpoint has a weight {hf_name!r} that {type(model).__name__} does not "
                f"expect (is the architecture or quantization setting right?)"
            ) from None
        except ValueError as exc:
            raise ValueError(f"cannot load {hf_name!r}: {exc}") from exc
        loaded.setdefault(name, set()).update(shards)

    missing = []
    for name in params:
        module = model.get_submodule(name.rpartition(".")[0])
        if not _needed_shards(module, name.rpartition(".")[2]) <= loaded.get(name, set()):
            missing.append(name)
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} weight(s) of {type(model).__name__}: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )


def _load_one(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    name: str,
    tensor: torch.Tensor,
    expert_weights: dict[str, tuple[str, int | None]],
) -> tuple[str, set[Any]]:
    """Load one tensor; returns our parameter's name and the shards it filled."""
    expert = _EXPERT.match(name)
    if expert is not None and expert["proj"] in expert_weights:
        ours, shard = expert_weights[expert["proj"]]
        name = f"{expert['layer']}.{ours}_{expert['kind']}"
        param = params[name]
        module = model.get_submodule(expert["layer"])
        index = int(expert["expert"])
        module.weight_loader(param, tensor, index, shard)
        return name, {(index, shard)}

    shard = None
    for hf_part, (part, index) in MERGED_WEIGHTS.items():
        if hf_part in name:
            name, shard = name.replace(hf_part, part), index
            break
    param = params[name]
    module = model.get_submodule(name.rpartition(".")[0])
    if shard is not None:
        module.weight_loader(param, tensor, shard)
        return name, {shard}
    if isinstance(module, Linear) and module.num_shards > 1:
        module.load_fused(param, tensor)  # the checkpoint stores the merged layer as one tensor
        return name, set(range(module.num_shards))
    module.weight_loader(param, tensor)
    return name, {None}


def _needed_shards(module: nn.Module, param_name: str) -> set[Any]:
    if isinstance(module, FusedMoE):
        return module.needed_shards(param_name)
    if isinstance(module, Linear) and module.num_shards > 1:
        return set(range(module.num_shards))
    return {None}
