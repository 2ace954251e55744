"""The memory roofline of a throughput run: every step reads all the weights and the KV cache of
every running request at least once, so it cannot take less than those bytes over the device's
copy bandwidth, measured in the same run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagedserve.core.model_runner import ModelRunner


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes moved per second (read + write, as STREAM's copy counts them) by the best of
    ``repeats`` device-to-device copies of ``nbytes``."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy touches fresh pages: not timed
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / min(times)


def weight_bytes(runner: ModelRunner) -> int:
    """Bytes of the model's parameters and buffers (a tied LM head counted once)."""
    tensors = {id(t): t for t in (*runner.model.parameters(), *runner.model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes_per_token(runner: ModelRunner) -> int:
    """Bytes of K and V one token holds across all layers."""
    element = torch.empty((), dtype=runner.kv_cache_dtype).element_size()
    return sum(2 * layer.num_kv_heads * layer.head_size * element for layer in runner.attention_layers)


def roofline(runner: ModelRunner, num_steps: int, kv_tokens_read: int, output_tokens: int) -> dict[str, float]:
    """The fastest the run could have been if each step only read its bytes at copy bandwidth."""
    bandwidth = copy_bandwidth(runner.device)
    weights, per_token = weight_bytes(runner), kv_bytes_per_token(runner)
    seconds = (num_steps * weights + kv_tokens_read * per_token) / bandwidth
    return {
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "weight_bytes": weights,
        "kv_bytes_per_token": per_token,
        "kv_tokens_read": kv_tokens_read,
        "roofline_seconds": seconds,
        "roofline_output_tokens_per_s": output_tokens / seconds,
    }
