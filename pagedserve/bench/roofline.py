"""The memory roofline of a throughput run: every step reads all the weights and the KV cache of
every running request at least once, so it cannot take less than those bytes over the device's
copy bandwidth, measured in the same run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from pagedserve.core.kv_sizing import kv_bytes_per_block

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


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (a tied LM head counted once), a weight packed
    for oneDNN in place of its dense copy (``cpu_gemm``) counted as packed."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():
        packed = getattr(module, "onednn_weight", None)
        if packed is not None and module.weight.numel() == 0:
            total += packed.numel() * packed.element_size()
    return total


def weight_bytes(runner: ModelRunner) -> int:
    return model_weight_bytes(runner.model)


def kv_bytes_per_token(runner: ModelRunner) -> int:
    """Bytes of K and V one token holds across all layers (the runner's block size of 1)."""
    layers = [(layer.num_kv_heads, layer.head_size) for layer in runner.attention_layers]
    return kv_bytes_per_block(layers, 1, runner.backend.kv_cache_shape, runner.kv_cache_dtype)


def roofline_seconds(
    num_steps: int, weight_bytes: int, kv_tokens_read: int, kv_bytes_per_token: int, bandwidth: float
) -> float:
    """The least time ``num_steps`` steps take if each reads every weight once and the K/V of
    ``kv_tokens_read`` tokens in all (over the steps) at ``bandwidth`` bytes/s, and nothing else."""
    return (num_steps * weight_bytes + kv_tokens_read * kv_bytes_per_token) / bandwidth


def roofline(runner: ModelRunner, num_steps: int, kv_tokens_read: int, output_tokens: int) -> dict[str, float]:
    """The fastest the run could have been if each step only read its bytes at copy bandwidth."""
    bandwidth = copy_bandwidth(runner.device)
    weights, per_token = weight_bytes(runner), kv_bytes_per_token(runner)
    seconds = roofline_seconds(num_steps, weights, kv_tokens_read, per_token, bandwidth)
    return {
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "weight_bytes": weights,
        "kv_bytes_per_token": per_token,
        "kv_tokens_read": kv_tokens_read,
        "roofline_seconds": seconds,
        "roofline_output_tokens_per_s": output_tokens / seconds,
    }
