"""The LoRA adapter manager: slots next to the model, an LRU cache of loaded adapters, and the
per-step token -> slot mapping.

Every ``Linear`` of the model gets a ``LoRALinearSlot`` in its LoRA slot: stacked A and B
buffers for ``max_loras`` adapters of rank up to ``max_lora_rank``, allocated once, so a step
allocates nothing. A merged layer (qkv, gate_up) stacks its shards: A is ``[shards * R, in]``
and B is block-diagonal ``[shards * R, out]``, so one shrink and one expand serve all shards.
PEFT names modules as HF does (``q_proj``); ``packed_modules_mapping`` (vLLM's name; a model
may define its own) says which merged layer and shard each one is.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pagedserve.core.config import LoRAConfig
from pagedserve.core.layers.linear import Linear
from pagedserve.core.lora import LoRAManagerBase, LoRARequest
from pagedserve.core.plugins import Registry
from pagedserve.plugins.lora.mapping import LoRAMapping
from pagedserve.plugins.lora.weights import LoRAAdapterWeights, LoRAModuleWeights

logger = logging.getLogger(__name__)

#: Our merged layer -> the HF modules it holds, in shard order.
PACKED_MODULES: dict[str, list[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}

#: Per linear layer name: shard index -> weights.
ResolvedAdapter = dict[str, dict[int, LoRAModuleWeights]]
AddLoRA = Callable[..., torch.Tensor]


def select_kernels(device: torch.device) -> AddLoRA:
    """Triton's shrink/expand on CUDA when Triton imports, else the torch path."""
    if device.type == "cuda":
        try:
            from pagedserve.plugins.lora.ops_triton import add_lora
        except ImportError:
            logger.warning("Triton is not installed: LoRA runs on the torch path")
        else:
            return add_lora
    from pagedserve.plugins.lora.ops_torch import add_lora

    return add_lora


class LoRALinearSlot:
    """What a ``Linear`` calls as ``lora_adapter(x, out, mapping)``: its slots' A and B."""

    def __init__(
        self, layer: Linear, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device,
        kernels: AddLoRA,
    ) -> None:
        self.output_sizes = list(layer.output_sizes)
        self.offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.input_size = layer.input_size
        self.max_rank = max_rank
        stacked = layer.num_shards * max_rank
        self.lora_a = torch.zeros(max_loras, stacked, layer.input_size, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_loras, stacked, layer.output_size, dtype=dtype, device=device)
        #: Per slot: does its adapter change this layer at all?
        self.in_use = [False] * max_loras
        self.kernels = kernels

    def set(self, slot: int, shards: dict[int, LoRAModuleWeights]) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for shard, weights in shards.items():
            rank, start = weights.rank, shard * self.max_rank
            offset, size = self.offsets[shard], self.output_sizes[shard]
            self.lora_a[slot, start : start + rank].copy_(weights.lora_a)
            self.lora_b[slot, start : start + rank, offset : offset + size].copy_(
                (weights.lora_b * weights.scaling).T
            )
        self.in_use[slot] = bool(shards)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
        return self.kernels(out, x, self.lora_a, self.lora_b, mapping, self.in_use)


class LoRAModelManager(LoRAManagerBase):
    """Adapters in ``max_loras`` slots on the model's device and ``max_cpu_loras`` in memory."""

    def __init__(self, model: nn.Module, config: LoRAConfig, device: torch.device, formats: Registry) -> None:
        self.config = config
        self.device = device
        self.formats = sorted(formats.entries(), key=lambda e: (-e.metadata.get("priority", 0), e.name))
        dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
        kernels = select_kernels(device)
        packed = getattr(model, "packed_modules_mapping", PACKED_MODULES)
        #: HF module name -> (our linear layer's name, shard index).
        self.targets: dict[str, tuple[str, int]] = {}
        self.layers: dict[str, Linear] = {}
        self.slots: dict[str, LoRALinearSlot] = {}
        for name, module in model.named_modules():
            if not isinstance(module, Linear):
                continue
            self.layers[name] = module
            self.slots[name] = LoRALinearSlot(module, config.max_loras, config.max_lora_rank, dtype, device, kernels)
            module.lora_adapter = self.slots[name]
            parent, _, leaf = name.rpartition(".")
            parts = packed.get(leaf, ())
            if module.num_shards > 1 and len(parts) == module.num_shards:
                for shard, part in enumerate(parts):
                    self.targets[f"{parent}.{part}" if parent else part] = (name, shard)
            elif module.num_shards == 1:
                self.targets[name] = (name, 0)
        self._cpu: OrderedDict[int, tuple[LoRARequest, ResolvedAdapter]] = OrderedDict()
        self._slot_ids: list[int | None] = [None] * config.max_loras
        self._slot_last_step = [0] * config.max_loras
        self._step = 0

    # -- adapters ---------------------------------------------------------------------------------

    def add_adapter(self, lora_request: LoRARequest) -> None:
        known = self._cpu.get(lora_request.lora_int_id)
        if known is not None:
            old = known[0]
            if (old.lora_name, old.lora_path) != (lora_request.lora_name, lora_request.lora_path):
                raise ValueError(
                    f"lora_int_id {lora_request.lora_int_id} is already adapter {old.lora_name!r} "
                    f"({old.lora_path}); give this adapter another id"
                )
            self._cpu.move_to_end(lora_request.lora_int_id)
            return
        resolved = self._load(lora_request)
        self._cpu[lora_request.lora_int_id] = (lora_request, resolved)
        while len(self._cpu) > self.config.max_cpu_loras:
            self._cpu.popitem(last=False)

    def remove_adapter(self, lora_int_id: int) -> bool:
        found = self._cpu.pop(lora_int_id, None) is not None
        if lora_int_id in self._slot_ids:
            slot = self._slot_ids.index(lora_int_id)
            self._slot_ids[slot] = None
            for layer_slot in self.slots.values():
                layer_slot.in_use[slot] = False
            found = True
        return found

    def list_adapters(self) -> list[LoRARequest]:
        return [request for request, _ in self._cpu.values()]

    def _load(self, lora_request: LoRARequest) -> ResolvedAdapter:
        import os

        from pagedserve.assets import bundled_adapter_path

        name, path = lora_request.lora_name, lora_request.lora_path
        bundled = bundled_adapter_path(path)
        if bundled is not None and not os.path.exists(path):
            path = str(bundled)
        if not os.path.isdir(path):
            raise ValueError(f"LoRA adapter {name!r}: {path!r} is not a folder")
        for entry in self.formats:
            loader = entry.load()
            if loader.matches(path):
                break
        else:
            known = ", ".join(e.name for e in self.formats) or "none"
            raise ValueError(
                f"LoRA adapter {name!r}: no LoRA format recognises {path} (known: {known}; a PEFT "
                "adapter has adapter_config.json)"
            )
        try:
            weights = loader.load(path, self.config.max_lora_rank)
            return self._resolve(weights)
        except ValueError as exc:
            raise ValueError(f"LoRA adapter {name!r}: {exc}") from exc
        except Exception as exc:  # a corrupt file: the user's problem, not the engine's
            raise ValueError(f"LoRA adapter {name!r}: cannot read {path}: {exc}") from exc

    def _resolve(self, weights: LoRAAdapterWeights) -> ResolvedAdapter:
        """Place each module on our layers, checking every shape against the base model."""
        resolved: ResolvedAdapter = {}
        for module, lora in weights.modules.items():
            target = self.targets.get(module)
            if target is None:
                raise ValueError(
                    f"it adapts {module!r}, which is not a linear layer of this base model "
                    "(an adapter of another architecture?)"
                )
            layer_name, shard = target
            layer = self.layers[layer_name]
            expected = (layer.input_size, layer.output_sizes[shard])
            got = (lora.lora_a.shape[1], lora.lora_b.shape[0])
            if got != expected:
                raise ValueError(
                    f"{module}: the adapter maps {got[0]} -> {got[1]} features, the base model's "
                    f"layer {expected[0]} -> {expected[1]} (an adapter of another base model?)"
                )
            resolved.setdefault(layer_name, {})[shard] = lora
        return resolved

    # -- one step ---------------------------------------------------------------------------------

    def prepare_step(
        self, lora_requests: Sequence[LoRARequest | None], num_tokens: Sequence[int]
    ) -> Any:
        wanted = {r.lora_int_id: r for r in lora_requests if r is not None}
        if not wanted:
            return None
        if len(wanted) > len(self._slot_ids):
            raise RuntimeError(
                f"a step holds {len(wanted)} adapters but there are only {len(self._slot_ids)} "
                "slots (the scheduler admits at most max_loras)"
            )
        self._step += 1
        for lora_int_id, request in wanted.items():
            if lora_int_id not in self._slot_ids:
                self._activate(request, wanted)
            self._slot_last_step[self._slot_ids.index(lora_int_id)] = self._step
        slot_of = {lora_int_id: slot for slot, lora_int_id in enumerate(self._slot_ids)}
        request_slots = [-1 if r is None else slot_of[r.lora_int_id] for r in lora_requests]
        return LoRAMapping.build(request_slots, num_tokens, self.device)

    def _activate(self, request: LoRARequest, wanted: dict[int, LoRARequest]) -> None:
        """Load an adapter into a free slot, or the least recently used one this step leaves."""
        free = [s for s, i in enumerate(self._slot_ids) if i is None or i not in wanted]
        slot = min(free, key=lambda s: (self._slot_ids[s] is not None, self._slot_last_step[s]))
        if request.lora_int_id not in self._cpu:  # evicted from memory since it was added
            self.add_adapter(request)
        self._cpu.move_to_end(request.lora_int_id)
        resolved = self._cpu[request.lora_int_id][1]
        for layer_name, layer_slot in self.slots.items():
            layer_slot.set(slot, resolved.get(layer_name, {}))
        self._slot_ids[slot] = request.lora_int_id
