"""How big the KV cache is: bytes per block and the number of blocks a memory budget holds.

Pure functions of the configuration and the model's attention layers, so that the model runner
(which sizes its cache at start-up) and ``pagedserve plan`` (which predicts that size for a device
it does not have) compute it with the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from pagedserve.core.config import ConfigError, EngineConfig

#: The CPU has no memory to profile: without a size, the KV cache holds max_num_seqs sequences of
#: max_model_len tokens (no preemption ever), capped at this many bytes.
CPU_DEFAULT_KV_BYTES = 4 << 30

#: ``backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)``.
KVCacheShape = Callable[[int, int, int, int], tuple[int, ...]]


@dataclass(frozen=True)
class DeviceMemory:
    """An accelerator's memory as the KV sizing sees it, in bytes: the terms of
    ``total x gpu_memory_utilization - used_by_others - weights - activations``."""

    total: int
    #: Held by other processes and by this process outside torch's allocator (the CUDA context).
    used_by_others: int
    #: This process's tensors before the KV cache: the weights (and the runner's buffers).
    weights: int
    #: The peak of the largest step's activations and logits above ``weights``: measured by the
    #: runner's profile step (torch's allocator statistics), estimated by ``pagedserve plan``.
    activations: int
    #: "measured" or "estimated": how ``activations`` was found (for the start-up log).
    activations_source: str = "measured"

    def budget(self, gpu_memory_utilization: float) -> int:
        return int(self.total * gpu_memory_utilization) - self.used_by_others - self.weights - self.activations

    def describe(self, gpu_memory_utilization: float) -> str:
        """Each term of the budget, for the start-up log."""
        mib = 2**20
        return (
            f"{gpu_memory_utilization:g} x {self.total / mib:.0f} MiB total - {self.used_by_others / mib:.0f} MiB "
            f"used outside this process's tensors - {self.weights / mib:.0f} MiB weights - "
            f"{self.activations / mib:.0f} MiB activation peak ({self.activations_source}) = "
            f"{self.budget(gpu_memory_utilization) / mib:.0f} MiB for the KV cache"
        )


class AllocatorStats(Protocol):
    """What the KV sizing reads from a device's allocator (``torch.cuda``'s functions; a test
    fakes them on the CPU)."""

    def mem_get_info(self) -> tuple[int, int]: ...
    def memory_reserved(self) -> int: ...
    def memory_allocated(self) -> int: ...
    def max_memory_allocated(self) -> int: ...
    def reset_peak_memory_stats(self) -> None: ...


class CudaAllocatorStats:
    """``torch.cuda``'s allocator statistics of one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


def allocator_stats(device: torch.device) -> AllocatorStats | None:
    """The device's allocator statistics; None where there is no memory to profile (the CPU)."""
    return CudaAllocatorStats(device) if device.type == "cuda" else None


def measure_memory(stats: AllocatorStats, profile_step: Callable[[], None]) -> DeviceMemory:
    """The memory terms around ``profile_step`` (the largest step the scheduler can make), as
    vLLM's profile run finds them: other users and weights before it, the allocator's peak
    above what was allocated when it started."""
    free, total = stats.mem_get_info()
    weights = stats.memory_allocated()
    used_by_others = total - free - stats.memory_reserved()
    stats.reset_peak_memory_stats()
    before = stats.memory_allocated()
    profile_step()
    activations = max(stats.max_memory_allocated() - before, 0)
    return DeviceMemory(total=total, used_by_others=used_by_others, weights=weights, activations=activations)


def estimate_activation_bytes(
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    dtype_bytes: int,
) -> int:
    """What ``pagedserve plan`` assumes the profile step will measure: the widest point of one
    decoder layer over ``max_num_batched_tokens`` tokens (the MLP's gate and up outputs [T, 2I]
    and their product [T, I], beside a few [T, H] hidden states: the residual, the normed input,
    the attention output) plus the logits of ``max_num_seqs`` sampled rows in float32 and the
    sampler's copies of them (log-softmax, sorted values and their int64 order for top-k/top-p,
    probabilities, noise). Logits are computed for the sampled rows only, never for every token
    of the step. Layers run one after another, so one layer's width is the peak."""
    layer = max_num_batched_tokens * (3 * intermediate_size + 4 * hidden_size) * dtype_bytes
    logits = max_num_seqs * vocab_size * (dtype_bytes + 4 * 6)
    return layer + logits


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


def kv_cache_budget(config: EngineConfig, bytes_per_block: int, memory: DeviceMemory | None) -> int:
    """Bytes the KV cache may take: ``kv_cache_memory_bytes`` when set; on an accelerator
    (``memory``) its share under ``gpu_memory_utilization`` after other users, the weights and
    the activation peak; on the CPU (``memory=None``) enough for ``max_num_seqs`` full-length
    sequences, capped at ``CPU_DEFAULT_KV_BYTES``."""
    cache = config.cache
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes
    scheduler = config.scheduler
    if memory is not None:
        return memory.budget(cache.gpu_memory_utilization)
    blocks_per_seq = -(-config.model.max_model_len // cache.block_size)
    return min(scheduler.max_num_seqs * blocks_per_seq * bytes_per_block, CPU_DEFAULT_KV_BYTES)


def blocks_in_budget(budget: int, bytes_per_block: int) -> int:
    """Whole blocks of ``bytes_per_block`` in ``budget`` (0 or fewer when nothing fits)."""
    return max(budget, 0) // bytes_per_block


def num_kv_blocks(config: EngineConfig, bytes_per_block: int, memory: DeviceMemory | None) -> int:
    """The number of KV blocks the engine allocates (``num_kv_blocks`` when configured)."""
    if config.cache.num_kv_blocks is not None:
        return config.cache.num_kv_blocks
    budget = kv_cache_budget(config, bytes_per_block, memory)
    blocks = blocks_in_budget(budget, bytes_per_block)
    if blocks < 1:
        raise ConfigError(
            f"the KV cache budget ({budget} bytes) holds no block of {bytes_per_block} bytes; "
            "raise kv_cache_memory_bytes / gpu_memory_utilization or use a smaller model"
        )
    return blocks
