"""The roofline of a throughput run, both measured in the same run:

- memory: every step reads all the weights and the KV cache of every running request at least
  once, so it cannot take less than those bytes over the device's copy bandwidth;
- arithmetic: a step's tokens each pass through every linear layer (a MoE layer's ``top_k``
  experts), each sampled token through the LM head, and each query attends to its context, so a
  step cannot take less than those FLOPs at the device's best measured matmul rate.

A step takes at least the larger of the two (``bound``). Large batches and prefills are bound by
arithmetic, small decode batches by memory: a run that mixes them is bounded by neither alone."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagedserve.core.kv_sizing import kv_bytes_per_block
from pagedserve.core.layers import cpu_gemm
from pagedserve.core.layers.attention import Attention
from pagedserve.core.layers.embedding import LMHead
from pagedserve.core.layers.linear import Linear
from pagedserve.core.layers.quantization import UnquantizedLinearMethod
from pagedserve.plugins.moe import FusedMoE
from pagedserve.plugins.moe.layer import MoEMethod

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


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the fastest dense matmul the engine has for ``dtype`` here, on a square GEMM
    large enough to be bound by arithmetic (on the CPU the better of ``F.linear`` and oneDNN on a
    packed weight, the two kernels eager CPU engines choose between), best of ``repeats``."""
    size = 1024 if device.type == "cpu" else 8192
    x = torch.randn(size, size, dtype=dtype, device=device)
    w = torch.randn(size, size, dtype=dtype, device=device)
    kernels = [lambda: torch.nn.functional.linear(x, w)]
    if device.type == "cpu" and dtype in cpu_gemm.PACKED_DTYPES and cpu_gemm.onednn_available():
        packed = cpu_gemm.pack(w)
        kernels.append(lambda: cpu_gemm.packed_linear(x, packed, None))
    best = float("inf")
    with torch.inference_mode():
        for kernel in kernels:
            kernel()  # warm-up: oneDNN's first call of a shape sets it up
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                kernel()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def flops_per_token(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """The FLOPs of a model's matmuls, as (every token through the linear layers and its
    ``top_k`` experts, a sampled token through the LM head, a query against one key in every
    attention layer); None when a layer's weights are quantized (its matmul is not the dense one
    ``matmul_peak_flops`` times)."""
    layers = head = attention = 0
    for module in model.modules():
        if isinstance(module, Linear):
            if type(module.quant_method) is not UnquantizedLinearMethod:
                return None
            layers += 2 * module.input_size * module.output_size
        elif isinstance(module, FusedMoE):
            if type(module.quant_method) is not MoEMethod:
                return None
            layers += 2 * module.top_k * 3 * module.intermediate_size * module.hidden_size
        elif isinstance(module, LMHead):
            if module.quant_method is not None:
                return None
            head += 2 * module.shard.rows * module.hidden_size
        elif isinstance(module, Attention):
            attention += 4 * module.num_heads * module.head_size  # scores and the weighted sum
    return layers, head, attention


@dataclass
class StepWork:
    """What one engine step computed: tokens through the model, tokens sampled, and the context
    tokens its requests hold after it (the keys their queries attended)."""

    tokens: int
    sampled: int
    kv_tokens: int


def bound_seconds(
    steps: list[StepWork], weight_bytes: int, kv_bytes_per_token: int, bandwidth: float,
    flops: tuple[int, int, int], peak: float,
) -> tuple[float, float]:
    """(the arithmetic time of ``steps`` alone, the least time they take when each takes the
    larger of its bytes at ``bandwidth`` and its FLOPs at ``peak``). Attention is counted as one
    query per context token: exact for a decode step, less than a prefill's causal attention,
    so the bound stays a lower bound."""
    layers, head, attention = flops
    arithmetic = total = 0.0
    for step in steps:
        step_flops = layers * step.tokens + head * step.sampled + attention * step.kv_tokens
        arithmetic += step_flops / peak
        total += max((weight_bytes + step.kv_tokens * kv_bytes_per_token) / bandwidth, step_flops / peak)
    return arithmetic, total


def roofline(runner: ModelRunner, steps: list[StepWork], output_tokens: int) -> dict[str, float]:
    """The fastest the run could have been if each step only read its bytes at copy bandwidth,
    and (dense weights) if each step took the larger of that and its FLOPs at the best measured
    matmul rate."""
    bandwidth = copy_bandwidth(runner.device)
    weights, per_token = weight_bytes(runner), kv_bytes_per_token(runner)
    kv_tokens_read = sum(step.kv_tokens for step in steps)
    seconds = roofline_seconds(len(steps), weights, kv_tokens_read, per_token, bandwidth)
    bound: dict[str, float] = {
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "weight_bytes": weights,
        "kv_bytes_per_token": per_token,
        "kv_tokens_read": kv_tokens_read,
        "roofline_seconds": seconds,
        "roofline_output_tokens_per_s": output_tokens / seconds,
    }
    flops = flops_per_token(runner.model)
    if flops is not None:
        peak = matmul_peak_flops(runner.device, runner.dtype)
        arithmetic, total = bound_seconds(steps, weights, per_token, bandwidth, flops, peak)
        bound.update(
            matmul_peak_gflop_per_s=peak / 1e9,
            flops_per_token_layers=flops[0],
            arithmetic_seconds=arithmetic,
            bound_seconds=total,
            bound_output_tokens_per_s=output_tokens / total,
        )
    return bound
