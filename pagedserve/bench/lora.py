"""``bench throughput --num-loras``: the same workload on the base model alone, spread over N
LoRA adapters in one engine (multi-LoRA batching), and served by merging each adapter into the
base weights and running the merged models one after another (the alternative without it).

The adapters are random PEFT-format ones of ``rank`` on every linear layer (their values do not
change the cost); merging is ``W + scaling * B @ A`` per layer, written as a model folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pagedserve.bench.throughput import run_throughput
from pagedserve.bench.workload import BenchRequest
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.engine import LLMEngine
from pagedserve.core.lora import LoRARequest

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _weights(model_path: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def make_random_adapters(model_path: str, out_dir: Path, count: int, rank: int, seed: int = 0) -> list[Path]:
    """``count`` PEFT-format adapters (adapter_config.json + adapter_model.safetensors)."""
    base = _weights(model_path)
    modules = [n.removesuffix(".weight") for n in base if n.endswith(".weight") and n.split(".")[-2] in LINEAR_SUFFIXES]
    generator = torch.Generator().manual_seed(seed)
    folders = []
    for i in range(count):
        tensors = {}
        for module in modules:
            out_features, in_features = base[f"{module}.weight"].shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.02
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.02
        folder = out_dir / f"adapter-{i}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LINEAR_SUFFIXES),
                  "bias": "none", "base_model_name_or_path": model_path}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders


def merge_adapter(model_path: str, adapter: Path, out_dir: Path) -> Path:
    """The base model with the adapter folded into its weights, as a model folder."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    merged = _weights(model_path)
    for key, lora_a in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        lora_b = lora[key.replace(".lora_A.", ".lora_B.")]
        weight = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (weight.float() + scaling * lora_b.float() @ lora_a.float()).to(weight.dtype)
    out_dir.mkdir(parents=True)
    for item in Path(model_path).iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.endswith(".index.json"):
            shutil.copy(item, out_dir / item.name)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out_dir / "model.safetensors"))
    return out_dir


def run_lora_benchmark(
    model_path: str, engine_args: dict[str, Any], workload: list[BenchRequest], counts: list[int], rank: int,
    compare_merged: bool,
) -> dict[str, Any]:
    """Output tokens/s of the base model alone, of each N adapters (requests round-robin over
    them), and of the merged models served one after another; ratios against the base."""
    results: dict[str, Any] = {"lora_rank": rank, "num_loras": counts}
    base_engine = LLMEngine(engine_config_from_args(model_path, **{**engine_args, "enable_lora": False}))
    # Unmeasured first: the first run in a process pays one-time set-ups (oneDNN shapes).
    run_throughput(base_engine, workload)
    base = run_throughput(base_engine, workload)
    results["base_output_tokens_per_s"] = base["output_tokens_per_s"]
    del base_engine
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-lora-") as tmp:
        adapters = make_random_adapters(model_path, Path(tmp), max(counts), rank)
        lora_args = {**engine_args, "enable_lora": True, "max_loras": max(counts), "max_lora_rank": rank}
        engine = LLMEngine(engine_config_from_args(model_path, **lora_args))
        warm = [LoRARequest(f"adapter-{i}", i + 1, str(adapters[i])) for i in range(max(counts))]
        run_throughput(engine, workload, [warm[i % len(warm)] for i in range(len(workload))])
        for count in counts:
            loras = [LoRARequest(f"adapter-{i}", i + 1, str(adapters[i])) for i in range(count)]
            spread = [loras[i % count] for i in range(len(workload))]
            run = run_throughput(engine, workload, spread)
            results[f"loras_{count}_output_tokens_per_s"] = run["output_tokens_per_s"]
            results[f"loras_{count}_vs_base"] = run["output_tokens_per_s"] / base["output_tokens_per_s"]
            results[f"loras_{count}_mean_batch_size"] = run["mean_batch_size"]
        del engine
        if compare_merged:
            count = max(counts)
            start = time.perf_counter()
            generation_s, tokens = 0.0, 0
            for i in range(count):
                merged = merge_adapter(model_path, adapters[i], Path(tmp) / f"merged-{i}")
                merged_engine = LLMEngine(engine_config_from_args(str(merged), **{**engine_args, "enable_lora": False}))
                share = workload[i::count]
                run_throughput(merged_engine, share)  # as warm as the others (not counted)
                run = run_throughput(merged_engine, share)
                generation_s += run["elapsed_s"]
                tokens += run["output_tokens"]
                del merged_engine
            total_s = time.perf_counter() - start
            results[f"merged_{count}_sequential_output_tokens_per_s"] = tokens / generation_s
            results[f"merged_{count}_sequential_with_loading_output_tokens_per_s"] = tokens / total_s
            results[f"loras_{count}_vs_merged_sequential"] = (
                results[f"loras_{count}_output_tokens_per_s"] / (tokens / generation_s)
            )
    return results
