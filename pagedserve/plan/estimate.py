"""The plan: will a model fit on a device, how many requests at once, how fast, at what cost.

Nothing here is a second formula. The model is built on the ``meta`` device by its registered
architecture and weight format (every parameter's shape and dtype, no memory), its weight bytes
are counted as ``bench throughput`` counts them, the KV cache is sized by the engine's own
``core.kv_sizing`` and the decode bounds are the memory roofline ``bench throughput`` reports.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from pagedserve.assets import bundled_model_path
from pagedserve.bench.roofline import copy_bandwidth, model_weight_bytes, roofline_seconds
from pagedserve.core.config import EngineConfig, engine_config_from_args
from pagedserve.core.kv_sizing import (
    DeviceMemory,
    blocks_in_budget,
    estimate_activation_bytes,
    kv_bytes_per_block,
    kv_cache_budget,
)
from pagedserve.core.layers.attention import Attention
from pagedserve.core.layers.quantization import checkpoint_quant_config
from pagedserve.core.loader import ModelLoadError, build_model, get_model_max_len, load_hf_config, resolve_dtype
from pagedserve.core.plugins import get_plugin_manager
from pagedserve.plan.gpus import GB, GPU, GPUS, find_gpu
from pagedserve.plan.shapes import builtin_names, builtin_shape

#: What the CUDA context and the allocator's own reserve take on a GPU before any tensor (the
#: engine measures it as memory "used by others" at start-up; a plan cannot, so it assumes this).
CUDA_CONTEXT_BYTES = 512 * 2**20
DEFAULT_GPU = "H100"

#: ``--quantization`` for an unquantized config: the settings of the checkpoint
#: ``pagedserve quantize`` would make (4-bit AWQ / GPTQ with groups of 128, FP8 with a scale
#: per tensor).
QUANTIZED_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
}


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for: the model, the device, the engine settings and a workload."""

    model: str
    gpu: str | None = None
    #: "cuda" (a GPU of the table or given by --gpu-memory/--bandwidth) or "cpu" (the engine's
    #: CPU sizing rule; the bandwidth measured here unless given).
    device: str = "cuda"
    gpu_memory_gb: float | None = None
    bandwidth_gb_per_s: float | None = None
    price_per_hour: float | None = None
    spot_price_per_hour: float | None = None
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    #: The workload; None: 1024 prompt and 256 output tokens, or half and a quarter of a shorter
    #: max_model_len.
    input_len: int | None = None
    output_len: int | None = None


def load_plan_config(model: str) -> tuple[str, PretrainedConfig, str | None]:
    """(display name, transformers config, folder or None) of a built-in shape, a bundled model,
    a model folder or a bare ``config.json``. Never downloads."""
    shape = builtin_shape(model)
    if shape is not None:
        hub_id, values = shape
        return hub_id, AutoConfig.for_model(values.pop("model_type"), **values), None
    path = Path(model).expanduser()
    bundled = bundled_model_path(model)
    if bundled is not None:
        path = bundled
    if path.is_dir():
        return model, load_hf_config(str(path)), str(path)
    if path.is_file():
        try:
            values = json.loads(path.read_text())
            model_type = values.pop("model_type")
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{path} is not a config.json with a model_type: {exc}") from exc
        return model, AutoConfig.for_model(model_type, **values), None
    raise ModelLoadError(
        f"{model!r} is not a model folder, a config.json or a built-in shape "
        f"({', '.join(builtin_names())}); plan needs no weights, only the config"
    )


def engine_config(request: PlanRequest, model_max_len: int) -> EngineConfig:
    """The engine configuration the plan sizes, validated as the engine validates it."""
    config = engine_config_from_args(
        request.model,
        dtype=request.dtype,
        max_model_len=request.max_model_len,
        max_num_seqs=request.max_num_seqs,
        max_num_batched_tokens=request.max_num_batched_tokens,
        block_size=request.block_size,
        kv_cache_dtype=request.kv_cache_dtype,
        gpu_memory_utilization=request.gpu_memory_utilization,
        device=request.device,
    )
    config.finalize(model_max_len)
    return config


def _quantized(hf_config: PretrainedConfig, quantization: str | None) -> tuple[PretrainedConfig, str | None]:
    """The config to build: an unquantized one given ``--quantization`` gets the settings of the
    checkpoint that quantization makes."""
    if quantization in (None, "none") or checkpoint_quant_config(hf_config) is not None:
        return hf_config, quantization
    if quantization not in QUANTIZED_CHECKPOINTS:
        raise ValueError(f"quantization must be one of none, {', '.join(QUANTIZED_CHECKPOINTS)}; got {quantization!r}")
    quantized = copy.deepcopy(hf_config)
    quantized.quantization_config = dict(QUANTIZED_CHECKPOINTS[quantization])
    return quantized, quantization


def _quant_method(hf_config: PretrainedConfig) -> str | None:
    """The weight format the model is built with, None when unquantized."""
    settings = checkpoint_quant_config(hf_config)
    return str(settings.get("quant_method")).lower() if settings else None


def _weight_bytes_per_rank(model: torch.nn.Module, tp: int) -> int:
    """Each rank holds 1/tp of every matrix (linear layers by rows or columns, the embedding
    and LM head by vocabulary, as vLLM shards them) and all of every vector and buffer."""
    if tp == 1:
        return model_weight_bytes(model)
    tensors = {id(t): (t, True) for t in model.parameters()}
    tensors.update({id(t): (t, False) for t in model.buffers()})
    total = 0
    for tensor, is_param in tensors.values():
        nbytes = tensor.numel() * tensor.element_size()
        total += -(-nbytes // tp) if is_param and tensor.dim() >= 2 else nbytes
    return total


def _kv_layers(model: torch.nn.Module, tp: int) -> list[tuple[int, int]]:
    """(KV heads on one rank, head size) of each attention layer; fewer KV heads than ranks are
    replicated, one per rank."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    return [(max(1, layer.num_kv_heads // tp), layer.head_size) for layer in layers]


def _device(request: PlanRequest) -> tuple[GPU | None, int | None, float, str]:
    """(table GPU or None, memory bytes or None for the CPU, bandwidth bytes/s, its source).
    Without ``--gpu``, ``--gpu-memory`` or ``--bandwidth`` a GPU plan is for an H100."""
    gpu = None
    if request.device == "cpu" and (request.gpu is not None or request.gpu_memory_gb is not None):
        raise ValueError("--gpu and --gpu-memory describe a GPU; leave them out with --device cpu")
    if request.device == "cuda":
        given = request.gpu_memory_gb is not None or request.bandwidth_gb_per_s is not None
        if request.gpu is not None or not given:
            gpu = find_gpu(request.gpu or DEFAULT_GPU)
    if request.device == "cpu":
        memory = None
    elif request.gpu_memory_gb is not None:
        memory = int(request.gpu_memory_gb * GB)
    elif gpu is not None:
        memory = gpu.memory_bytes
    else:
        raise ValueError("give --gpu-memory (GB) with --bandwidth, or a --gpu of the table")
    if request.bandwidth_gb_per_s is not None:
        return gpu, memory, request.bandwidth_gb_per_s * GB, "given"
    if gpu is not None:
        return gpu, memory, gpu.bandwidth_gb_per_s * GB, f"{gpu.name} data sheet"
    if request.device == "cpu":
        return None, None, copy_bandwidth(torch.device("cpu")), "measured here (copy bandwidth)"
    raise ValueError("give --bandwidth (GB/s) with --gpu-memory, or a --gpu of the table")


def make_plan(request: PlanRequest, advise: bool = True) -> dict[str, Any]:
    """Every figure of the plan, as a JSON-ready dict."""
    if request.tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {request.tensor_parallel_size}")
    name, hf_config, folder = load_plan_config(request.model)
    config = engine_config(request, get_model_max_len(hf_config))
    max_model_len: int = config.model.max_model_len  # type: ignore[assignment]
    request = dataclasses.replace(
        request,
        input_len=min(1024, max_model_len // 2) if request.input_len is None else request.input_len,
        output_len=min(256, max_model_len // 4) if request.output_len is None else request.output_len,
    )
    if request.input_len < 1 or request.output_len < 1:
        raise ValueError("input_len and output_len must be at least 1")
    request_len = request.input_len + request.output_len
    if request_len > max_model_len:
        raise ValueError(
            f"the workload's requests are {request_len} tokens (input {request.input_len} + output "
            f"{request.output_len}), more than max_model_len={max_model_len}"
        )
    gpu, memory_bytes, bandwidth, bandwidth_source = _device(request)
    tp = request.tensor_parallel_size

    build_config, quantization = _quantized(hf_config, request.quantization)
    dtype = resolve_dtype(request.dtype, hf_config, request.device)
    dtype_name = str(dtype).removeprefix("torch.")
    model = build_model(build_config, quantization, dtype_name, "meta", folder=folder)
    weights = _weight_bytes_per_rank(model, tp)
    if quantization in (None, "none") and checkpoint_quant_config(hf_config) is None:
        dense = model
    else:  # parameters count as the dense model has them (a packed int32 holds eight)
        unquantized = copy.deepcopy(hf_config)
        unquantized.__dict__.pop("quantization_config", None)
        dense = build_model(unquantized, None, dtype_name, "meta")
    num_params = sum(p.numel() for p in dense.parameters())

    kv_dtype = torch.float8_e4m3fn if request.kv_cache_dtype == "fp8" else dtype
    backend = get_plugin_manager().registry("attention_backends").load(
        "torch_ref" if request.device == "cpu" else "triton")
    if request.device == "cpu" and (reason := backend.supports(config)) is not None:
        raise ValueError(f"the CPU engine cannot serve this: {reason}")
    kv_cache_shape = backend.kv_cache_shape
    layers = _kv_layers(model, tp)
    per_block = kv_bytes_per_block(layers, config.cache.block_size, kv_cache_shape, kv_dtype)
    per_token = kv_bytes_per_block(layers, 1, kv_cache_shape, kv_dtype)
    activations = None
    memory = None
    if memory_bytes is not None:
        activations = _activation_estimate(hf_config, config, torch.empty((), dtype=dtype).element_size(), tp)
        memory = DeviceMemory(memory_bytes, CUDA_CONTEXT_BYTES, weights, activations, "estimated")
    budget = kv_cache_budget(config, per_block, memory)
    blocks = blocks_in_budget(budget, per_block)

    block_size = config.cache.block_size
    blocks_per_full_seq = -(-max_model_len // block_size)
    blocks_per_request = -(-request_len // block_size)
    concurrency_workload = blocks // blocks_per_request
    batch = min(concurrency_workload, config.scheduler.max_num_seqs)
    fits = blocks >= blocks_per_full_seq

    # The memory roofline of one decode step: all weights once, each sequence's K/V at its mean
    # context over the output (input + output / 2).
    context = request.input_len + request.output_len / 2

    def decode_rate(batch_size: int) -> float:
        return batch_size / roofline_seconds(1, weights, int(batch_size * context), per_token, bandwidth)

    peak = None
    if gpu is not None:
        fp8 = _quant_method(build_config) in ("fp8", "compressed-tensors")
        peak = gpu.fp8_tflops if fp8 and gpu.fp8_tflops else gpu.bf16_tflops
    compute_ceiling = peak * 1e12 * tp / (2 * num_params) if peak else None

    plan: dict[str, Any] = {
        "model": name,
        "architecture": (hf_config.architectures or ["?"])[0],
        "num_parameters": num_params,
        "dtype": dtype_name,
        "quantization": _quant_method(build_config),
        "kv_cache_dtype": request.kv_cache_dtype,
        "device": request.device,
        "gpu": gpu.name if gpu else None,
        "gpu_memory_bytes": memory_bytes,
        "bandwidth_gb_per_s": bandwidth / GB,
        "bandwidth_source": bandwidth_source,
        "tensor_parallel_size": tp,
        "gpu_memory_utilization": config.cache.gpu_memory_utilization,
        "max_model_len": max_model_len,
        "block_size": block_size,
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "input_len": request.input_len,
        "output_len": request.output_len,
        "weight_bytes": weights,
        "weight_bytes_total": model_weight_bytes(model) if tp == 1 else weights * tp,
        "activation_reserve_bytes": activations,
        "kv_bytes_per_token": per_token,
        "kv_cache_bytes": max(blocks, 0) * per_block,
        "num_kv_blocks": blocks,
        "kv_tokens": blocks * block_size,
        "max_concurrency_at_max_model_len": blocks / blocks_per_full_seq,
        "max_concurrency_at_workload_len": concurrency_workload,
        "batch_at_full_concurrency": batch,
        "fits": fits,
        "decode_tokens_per_s": None,
        "cost_per_million_output_tokens": None,
    }
    if not fits:
        plan["why_not"] = _why_not(plan, budget)
        if advise:
            plan["changes_that_fit"] = _changes_that_fit(request, plan)
    if batch >= 1:
        rates = {
            "memory_roofline_batch_1": decode_rate(1),
            "memory_roofline_full_concurrency": decode_rate(batch),
            "compute_ceiling": compute_ceiling,
        }
        plan["decode_tokens_per_s"] = rates
        plan["cost_per_million_output_tokens"] = _costs(request, gpu, tp, min(
            rates["memory_roofline_full_concurrency"], compute_ceiling or float("inf")))
    return plan


def _activation_estimate(hf_config: PretrainedConfig, config: EngineConfig, dtype_bytes: int, tp: int) -> int:
    """``kv_sizing.estimate_activation_bytes`` for this model: the engine measures this peak in
    its profile step at start-up; a plan cannot, so it estimates it. A mixture-of-experts layer
    carries each token through ``num_experts_per_tok`` experts; tensor parallelism splits the
    MLP's width."""
    hidden = int(hf_config.hidden_size)
    intermediate = int(getattr(hf_config, "intermediate_size", None) or 4 * hidden)
    intermediate *= int(getattr(hf_config, "num_experts_per_tok", None) or 1)
    return estimate_activation_bytes(
        hidden, -(-intermediate // tp), int(hf_config.vocab_size),
        int(config.scheduler.max_num_batched_tokens), config.scheduler.max_num_seqs, dtype_bytes,
    )


def _why_not(plan: dict[str, Any], budget: int) -> str:
    if budget <= 0:
        return (
            f"the weights ({plan['weight_bytes'] / GB:.1f} GB a GPU) and the activation reserve leave "
            "no room for the KV cache"
        )
    return (
        f"the KV cache holds {plan['kv_tokens']} tokens, less than one sequence of "
        f"max_model_len={plan['max_model_len']}"
    )


def _costs(request: PlanRequest, gpu: GPU | None, tp: int, tokens_per_s: float) -> dict[str, float] | None:
    on_demand = request.price_per_hour if request.price_per_hour is not None else gpu and gpu.price_per_hour
    spot = request.spot_price_per_hour if request.spot_price_per_hour is not None else gpu and gpu.spot_price_per_hour
    costs = {}
    for kind, price in (("on_demand", on_demand), ("spot", spot)):
        if price:
            costs[kind] = price * tp / (tokens_per_s * 3600) * 1e6
    return costs or None


def _changes_that_fit(request: PlanRequest, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Single changes of the request that make the model fit, the least disruptive first: a
    smaller step (less room reserved for its logits), an FP8 KV cache, a shorter context, FP8 or
    4-bit weights, tensor parallelism, a bigger GPU. Each is planned again by ``make_plan``."""
    candidates: list[tuple[str, PlanRequest]] = []
    if plan["activation_reserve_bytes"] is not None:  # a smaller step reserves less for logits
        tokens = plan["max_num_batched_tokens"] // 2
        while tokens >= max(plan["max_num_seqs"], 64):  # the largest step that fits is tried first
            changed = dataclasses.replace(request, max_num_batched_tokens=tokens)
            candidates.append((f"--max-num-batched-tokens {tokens}", changed))
            tokens //= 2
    if request.kv_cache_dtype == "auto":
        candidates.append(("--kv-cache-dtype fp8", dataclasses.replace(request, kv_cache_dtype="fp8")))
    workload_len = request.input_len + request.output_len
    if plan["kv_tokens"] >= workload_len:
        shorter = plan["kv_tokens"] if plan["kv_tokens"] < 1024 else plan["kv_tokens"] // 1024 * 1024
        shorter = max(shorter, workload_len)
        candidates.append((f"--max-model-len {shorter}", dataclasses.replace(request, max_model_len=shorter)))
    if plan["quantization"] is None:
        gpu = GPUS.get(plan["gpu"] or "")
        if gpu is None or gpu.fp8_tflops:
            candidates.append(("--quantization fp8", dataclasses.replace(request, quantization="fp8")))
        candidates.append(("--quantization awq (4-bit)", dataclasses.replace(request, quantization="awq")))
    for tp in (2, 4, 8):
        if tp > request.tensor_parallel_size:
            candidates.append((f"--tensor-parallel-size {tp}", dataclasses.replace(request, tensor_parallel_size=tp)))
    if request.device == "cuda" and request.gpu_memory_gb is None:
        for gpu in sorted(GPUS.values(), key=lambda g: (g.memory_gb, g.price_per_hour)):
            if plan["gpu_memory_bytes"] is not None and gpu.memory_bytes > plan["gpu_memory_bytes"]:
                candidates.append((f"--gpu {gpu.name}", dataclasses.replace(request, gpu=gpu.name)))
    found, seen = [], set()
    for change, changed in candidates:
        flag = change.split()[0]
        if flag in seen:
            continue  # of each flag, only its smallest change that fits
        try:
            result = make_plan(changed, advise=False)
        except ValueError:
            continue
        if result["fits"]:
            found.append({"change": change, "kv_tokens": result["kv_tokens"],
                          "max_concurrency_at_max_model_len": result["max_concurrency_at_max_model_len"]})
            seen.add(flag)
    return found
