"""Quantization benchmark (issue 5): what AWQ, GPTQ and FP8 cost in quality and save in memory.

Quality and memory (CPU or GPU), on a real checkpoint (default: the bundled ``pagedserve/tiny-py``):
the model is quantized with ``pagedserve quantize``'s code (AWQ through AutoAWQ, skipped when it
is not installed; GPTQ 4-bit act-order; FP8 per-channel), then for each format
- weight bytes: the checkpoint's linear-layer tensors (packed integers, scales, zeros, g_idx)
  against the same layers in fp16, and the whole checkpoint against its fp16 size;
- held-out perplexity: the standard library's held-out split (``pagedserve.assets.corpus``, the
  bundled models' evaluation set) in windows of ``--context`` tokens, and its increase over fp16.
Target: 4-bit linear weights at <= 30% of their fp16 bytes.

Decode speed (``--decode``, CUDA only): an 8B-shaped Llama (Llama-3-8B's sizes) with random
weights in bf16, AWQ, GPTQ (with and without act-order) and FP8; one decode step (every linear
layer, the paged attention backend, the LM head) for a batch of 1 and of 64 sequences with
``--decode-context`` cached tokens each; tokens/s and the ratio to bf16 measured in the same run.
Targets: W4A16 batch-1 decode >= 2x bf16; FP8 throughput >= 1.3x bf16.

    python benchmarks/quantization.py [--model pagedserve/tiny-py] [--max-windows 64]
    python benchmarks/quantization.py --decode --skip-quality
    python benchmarks/quantization.py --decode --skip-quality --dry-run   # the same code on the CPU, tiny
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedserve.assets import DEFAULT_MODEL  # noqa: E402
from pagedserve.assets.corpus import eval_windows, split_files, token_stream  # noqa: E402
from pagedserve.bench.report import format_table, write_result  # noqa: E402
from pagedserve.core.config import ModelConfig  # noqa: E402
from pagedserve.core.forward_context import build_batch_layout, set_forward_context  # noqa: E402
from pagedserve.core.layers.attention import Attention  # noqa: E402
from pagedserve.core.loader import default_dtype, load_model, model_class, resolve_model_path  # noqa: E402
from pagedserve.core.plugins import get_plugin_manager  # noqa: E402

BLOCK_SIZE = 16
#: Llama-3-8B's shapes.
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}
#: Decode formats: (name, quantization_config or None, forced quantization).
#: The dry run's shape: the 8B shape's layout, small enough for the CPU (hidden a multiple of the
#: 128-feature quantization groups).
TINY_SHAPE = {**LLAMA_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512}
DECODE_FORMATS = [
    ("bf16", None, None),
    ("awq", {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, None),
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, None),
    (
        "gptq-act-order",
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True},
        None,
    ),
    ("fp8", None, "fp8"),
]


# -- quality and memory ----------------------------------------------------------------------------


#: Bytes per element of the safetensors dtypes a checkpoint here can hold.
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "F8_E4M3": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


def tensor_sizes(folder: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (elements, bytes), from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    from pagedserve.core.loader import safetensors_files

    sizes = {}
    for file in safetensors_files(str(folder)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = f.get_slice(name)
                numel = math.prod(piece.get_shape())
                sizes[name] = (numel, numel * DTYPE_BYTES[piece.get_dtype()])
    return sizes


def byte_counts(folder: Path, linear_layers: set[str], as_fp16: bool = False) -> tuple[int, int]:
    """(bytes of the linear layers' tensors, bytes of all tensors); ``as_fp16``: 2 per element."""
    linear = total = 0
    for name, (numel, nbytes) in tensor_sizes(folder).items():
        size = 2 * numel if as_fp16 else nbytes
        total += size
        linear += size if name.rpartition(".")[0] in linear_layers else 0
    return linear, total


def held_out_windows(folder: Path, context: int, max_windows: int | None) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    stream = token_stream(
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        split_files()[1],
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    windows = eval_windows(stream, context)
    return windows[:max_windows] if max_windows else windows


@torch.inference_mode()
def perplexity(folder: Path, quantization: str | None, windows: list[list[int]], device: str, batch: int) -> float:
    """exp(mean NLL) of every window token but the first, each predicted from the tokens before it."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    model_config = ModelConfig(model=str(folder), dtype=str(dtype).removeprefix("torch."))
    model = load_model(model_config, quantization, device)
    backend = attention_backend(None)
    blocks_per_window = math.ceil(max(map(len, windows)) / BLOCK_SIZE)
    allocate_kv(model, backend, batch * blocks_per_window, dtype, device)
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        seqs = [
            (list(range(i * blocks_per_window, (i + 1) * blocks_per_window)), 0, len(w))
            for i, w in enumerate(chunk)
        ]
        layout = build_batch_layout(seqs, BLOCK_SIZE, device)
        ids = torch.tensor([t for w in chunk for t in w], device=device)
        with set_forward_context(backend, backend.build_metadata(layout)):
            logits = model.compute_logits(model(ids, layout.positions)).float()
        offset = 0
        for w in chunk:
            targets = torch.tensor(w[1:], device=device)
            nll += F.cross_entropy(logits[offset : offset + len(w) - 1], targets, reduction="sum").item()
            count += len(w) - 1
            offset += len(w)
    return math.exp(nll / count)


def quality(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from pagedserve.plugins.quant.calibration import calibration_files, calibration_samples
    from pagedserve.plugins.quant.checkpoint_io import linear_layer_names
    from pagedserve.plugins.quant.fp8_quantize import quantize_fp8_checkpoint
    from pagedserve.plugins.quant.gptq_quantize import quantize_gptq

    source = Path(resolve_model_path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(source)
    samples = calibration_samples(tokenizer, calibration_files(None), args.num_samples, args.seq_len)
    folders: dict[str, tuple[Path, str | None]] = {"fp16": (source, None)}
    try:
        from pagedserve.plugins.quant.awq_quantize import quantize_awq

        quantize_awq(source, work / "awq", samples, args.group_size)
        folders["awq"] = (work / "awq", None)
    except ValueError as exc:  # AutoAWQ missing
        print(f"skipping AWQ: {exc}", file=sys.stderr)
    quantize_gptq(source, work / "gptq", samples, 4, args.group_size, desc_act=True, sym=True)
    folders["gptq"] = (work / "gptq", None)
    quantize_fp8_checkpoint(source, work / "fp8", per_channel=True)
    folders["fp8"] = (work / "fp8", None)

    linear_layers = linear_layer_names(source)
    windows = held_out_windows(source, args.context, args.max_windows)
    fp16_linear, fp16_total = byte_counts(source, linear_layers, as_fp16=True)
    results: dict[str, Any] = {"windows": len(windows), "tokens": sum(len(w) - 1 for w in windows)}
    for name, (folder, quantization) in folders.items():
        linear, total = byte_counts(folder, linear_layers)
        ppl = perplexity(folder, quantization, windows, args.device, args.batch)
        results[name] = {
            "linear_bytes": linear,
            "linear_vs_fp16": linear / fp16_linear,
            "checkpoint_bytes": total,
            "checkpoint_vs_fp16": total / fp16_total,
            "perplexity": ppl,
        }
    for name in folders:
        results[name]["perplexity_increase"] = results[name]["perplexity"] / results["fp16"]["perplexity"] - 1
    return results


# -- decode speed -----------------------------------------------------------------------------------


def attention_backend(name: str | None) -> Any:
    registry = get_plugin_manager().registry("attention_backends")
    if name is None:
        name = "triton" if "triton" in registry and torch.cuda.is_available() else "torch_ref"
    return registry.load(name)(None)


def allocate_kv(model: torch.nn.Module, backend: Any, blocks: int, dtype: torch.dtype, device: str) -> None:
    for layer in model.modules():
        if isinstance(layer, Attention):
            shape = backend.kv_cache_shape(blocks, BLOCK_SIZE, layer.num_kv_heads, layer.head_size)
            layer.kv_cache = torch.zeros(shape, dtype=dtype, device=device)


@torch.no_grad()
def random_model(
    shape: dict[str, Any], quant_settings: dict[str, Any] | None, forced: str | None, device: str
) -> torch.nn.Module:
    """A Llama of ``shape`` with random weights in the given format (bfloat16 activations),
    processed for its kernels exactly as a loaded checkpoint would be. With act-order the groups
    are a random permutation of the input features, as GPTQ's would be."""
    from transformers import LlamaConfig

    from pagedserve.core.layers.quantization import get_quantization_config

    hf_config = LlamaConfig(**shape, **({"quantization_config": quant_settings} if quant_settings else {}))
    quant_config = get_quantization_config(forced, hf_config)
    with default_dtype(torch.bfloat16), torch.device(device):
        model = model_class(hf_config)(hf_config, quant_config)
    act_order = bool(quant_settings and quant_settings.get("desc_act"))
    for name, param in model.named_parameters():
        if name.endswith("g_idx"):
            features = param.numel()
            order = torch.randperm(features, device=device) if act_order else torch.arange(features, device=device)
            param.copy_(torch.argsort(order) // quant_settings["group_size"])
        elif param.dtype == torch.int32:
            param.random_(-(2**31), 2**31 - 1)
        elif name.endswith("scales"):
            param.uniform_(1e-3, 1e-2)
        else:
            param.normal_(0.0, 0.02)
    for module in model.modules():
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    return model.eval()


@torch.inference_mode()
def decode_tokens_per_second(
    model: torch.nn.Module, backend: Any, batch: int, context: int, steps: int, device: str
) -> float:
    """Tokens/s of one decode step (median of ``steps``) for ``batch`` sequences of ``context``
    cached tokens: the model's forward and the LM head, as the runner does it."""
    blocks_per_seq = math.ceil((context + 1) / BLOCK_SIZE)
    allocate_kv(model, backend, batch * blocks_per_seq, torch.bfloat16, device)
    seqs = [(list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), context, 1) for i in range(batch)]
    layout = build_batch_layout(seqs, BLOCK_SIZE, device)
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)

    def step() -> None:
        with set_forward_context(backend, backend.build_metadata(layout)):
            model.compute_logits(model(ids, layout.positions))
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def decode_batches(args: argparse.Namespace) -> tuple[int, ...]:
    return (1, 4) if args.dry_run else (1, 64)


def decode(args: argparse.Namespace) -> dict[str, Any]:
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(
            "the decode benchmark (--decode) needs a CUDA GPU and torch.cuda.is_available() is False "
            "here; run the quality part without --decode, or --decode --dry-run on the CPU"
        )
    device, shape = ("cpu", TINY_SHAPE) if args.dry_run else ("cuda", LLAMA_8B)
    backend = attention_backend(args.attention_backend)
    results: dict[str, Any] = {"attention_backend": type(backend).__name__}
    for name, settings, forced in DECODE_FORMATS:
        model = random_model(shape, settings, forced, device)
        results[name] = {
            f"batch_{b}_tokens_per_s": decode_tokens_per_second(
                model, backend, b, args.decode_context, args.steps, device
            )
            for b in decode_batches(args)
        }
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    for name, *_ in DECODE_FORMATS:
        for b in decode_batches(args):
            key = f"batch_{b}_tokens_per_s"
            results[name][f"batch_{b}_vs_bf16"] = results[name][key] / results["bf16"][key]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, hub id or bundled name")
    parser.add_argument("--device", default="cpu", help="for the perplexity runs")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument("--batch", type=int, default=8, help="windows per forward")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the quantized checkpoints here")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--decode", action="store_true", help="the GPU decode-speed part")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --decode: the same code on the CPU with a tiny shape (it only shows the code runs)")
    parser.add_argument("--decode-context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    results: dict[str, Any] = {}
    rows: list[tuple[str, Any]] = []
    if not args.skip_quality:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work_dir or Path(tmp)
            results["quality"] = quality(args, work)
        rows.append(("held-out tokens", results["quality"]["tokens"]))
        for name, r in results["quality"].items():
            if isinstance(r, dict):
                rows += [
                    (f"{name} linear bytes vs fp16", r["linear_vs_fp16"]),
                    (f"{name} checkpoint bytes vs fp16", r["checkpoint_vs_fp16"]),
                    (f"{name} perplexity", r["perplexity"]),
                    (f"{name} perplexity increase", r["perplexity_increase"]),
                ]
    if args.decode:
        results["decode"] = decode(args)
        for name, *_ in DECODE_FORMATS:
            for b in decode_batches(args):
                figures = results["decode"][name]
                rows.append((f"{name} decode batch {b} tokens/s", figures[f"batch_{b}_tokens_per_s"]))
                rows.append((f"{name} decode batch {b} vs bf16", figures[f"batch_{b}_vs_bf16"]))
    if not rows:
        sys.exit("nothing to run: drop --skip-quality or add --decode")
    print(format_table(rows))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).parent / "results" / f"quantization-{stamp}.json"
    device = ("cpu" if args.dry_run else "cuda") if args.decode else args.device
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    print(f"wrote {write_result(out, 'quantization', settings, results, device)}")


if __name__ == "__main__":
    main()
