"""How big the KV cache is: bytes per block and the number of blocks a memory budget holds.

Pure functions of the configuration and the model's attention layers, so that the model runner
(which sizes its cache at start-up) and ``pagedserve plan`` (which predicts that size for a device
it does not have) compute it with the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pagedserve.core.config import ConfigError, EngineConfig

#: The CPU has no memory to profile: without a size, the KV cache holds max_num_seqs sequences of
#: max_model_len tokens (no preemption ever), capped at this many bytes.
CPU_DEFAULT_KV_BYTES = 4 << 30

#: ``backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)``.
KVCacheShape = Callable[[int, int, int, int], tuple[int, ...]]


@dataclass(frozen=True)
class DeviceMemory:
    """An accelerator's memory as the KV sizing sees it, in bytes."""

    total: int
    #: Held by other processes and by this process outside its tensors (the CUDA context).
    used_by_others: int
    #: This process's tensors before the KV cache: the weights.
    allocated: int


def cuda_memory(device: torch.device) -> DeviceMemory:
    """The device's memory now, as ``torch.cuda`` reports it."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    return DeviceMemory(total=total, used_by_others=total - free - allocated, allocated=allocated)


def kv_bytes_per_block(
    layers: Iterable[tuple[int, int]], block_size: int, kv_cache_shape: KVCacheShape, dtype: torch.dtype
) -> int:
    """Bytes one block holds across all layers; ``layers`` gives each attention layer's
    ``(num_kv_heads, head_size)``, ``kv_cache_shape`` is the attention backend's layout."""
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for num_kv_heads, head_size in layers:
        total += element * int(torch.Size(kv_cache_shape(1, block_size, num_kv_heads, head_size)).numel())
    return total


def activation_bytes(max_num_batched_tokens: int, vocab_size: int) -> int:
    """The room left for activations and logits of the largest step."""
    return 64 * max_num_batched_tokens * vocab_size


def kv_cache_budget(config: EngineConfig, bytes_per_block: int, vocab_size: int, memory: DeviceMemory | None) -> int:
    """Bytes the KV cache may take: ``kv_cache_memory_bytes`` when set; on an accelerator
    (``memory``) its share under ``gpu_memory_utilization`` after the weights, other users and
    the activations; on the CPU (``memory=None``) enough for ``max_num_seqs`` full-length
    sequences, capped at ``CPU_DEFAULT_KV_BYTES``."""
    cache = config.cache
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes
    scheduler = config.scheduler
    if memory is not None:
        budget = int(memory.total * cache.gpu_memory_utilization) - memory.used_by_others - memory.allocated
        return budget - activation_bytes(scheduler.max_num_batched_tokens, vocab_size)
    blocks_per_seq = -(-config.model.max_model_len // cache.block_size)
    return min(scheduler.max_num_seqs * blocks_per_seq * bytes_per_block, CPU_DEFAULT_KV_BYTES)


def blocks_in_budget(budget: int, bytes_per_block: int) -> int:
    """Whole blocks of ``bytes_per_block`` in ``budget`` (0 or fewer when nothing fits)."""
    return max(budget, 0) // bytes_per_block


def num_kv_blocks(config: EngineConfig, bytes_per_block: int, vocab_size: int, memory: DeviceMemory | None) -> int:
    """The number of KV blocks the engine allocates (``num_kv_blocks`` when configured)."""
    if config.cache.num_kv_blocks is not None:
        return config.cache.num_kv_blocks
    budget = kv_cache_budget(config, bytes_per_block, vocab_size, memory)
    blocks = blocks_in_budget(budget, bytes_per_block)
    if blocks < 1:
        raise ConfigError(
            f"the KV cache budget ({budget} bytes) holds no block of {bytes_per_block} bytes; "
            "raise kv_cache_memory_bytes / gpu_memory_utilization or use a smaller model"
        )
    return blocks
