"""GPU benchmark of the Triton paged attention backend at Llama-3-8B shapes (32 query heads,
8 KV heads, head size 128, blocks of 16).

Decode (one new token per sequence, batch 1..256, context 512..32k): the backend's forward (KV
store + attention + split-KV reduction) against two baselines measured in the same run:
- the device-to-device copy bandwidth (``torch`` copy of a 2 GiB buffer, read + written bytes):
  the decode's achieved bandwidth (the K/V bytes it must read over its time) as a fraction of it;
- ``torch.nn.functional.scaled_dot_product_attention`` over a contiguous cache ([B, Hkv, L, D],
  ``enable_gqa``): the paged kernel's time over SDPA's.
Prefill (whole causal prompts): achieved TFLOP/s (causal FLOPs, 4 * H * D per visible query-key
pair) against SDPA's (causal, contiguous) at the same shape.

Targets (issue 4): decode >= 80% of the copy bandwidth at batch >= 32 and context >= 4k, and
never slower than SDPA over a contiguous cache.

    python benchmarks/attention.py [--quick] [--dtype bfloat16] [--out benchmarks/results/...]
    TRITON_INTERPRET=1 python benchmarks/attention.py --dry-run   # the same code on the CPU, tiny
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16
BATCHES = (1, 4, 16, 32, 64, 128, 256)
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
PREFILLS = ((1, 512), (1, 2048), (1, 8192), (1, 32768), (8, 2048), (32, 512))
QUICK_BATCHES = (1, 32, 128)
QUICK_CONTEXTS = (512, 4096, 16384)
QUICK_PREFILLS = ((1, 2048), (8, 2048))
#: Both caches (paged and contiguous) of a shape must fit in this share of the free memory.
MEMORY_SHARE = 0.8


def bench_ms(fn: Any) -> float:
    """Median milliseconds of ``fn`` (triton's do_bench: warm-up, L2 flushed between runs; on
    the CPU, the dry run: one call, which only shows the code runs)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    size = 1 << 30 if device.type == "cuda" else 1 << 20  # 2 GiB (2 MiB in the dry run)
    src = torch.empty(size, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_layer(window: int | None = None) -> Any:
    from pagedserve.core.layers.attention import Attention

    return Attention(NUM_HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, NUM_KV_HEADS, sliding_window=window)


def paged_setup(
    backend: Any, seqs_lens: list[tuple[int, int]], dtype: torch.dtype, device: torch.device
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random paged cache (shuffled block ids) holding each request's context, and the step's
    queries and new K/V for ``(context, new_tokens)`` per request."""
    from pagedserve.core.forward_context import build_batch_layout

    blocks_per_req = [math.ceil((c + n) / BLOCK_SIZE) for c, n in seqs_lens]
    num_blocks = sum(blocks_per_req)
    ids = torch.randperm(num_blocks).tolist()
    seqs, start = [], 0
    for (context, new), count in zip(seqs_lens, blocks_per_req):
        seqs.append((ids[start : start + count], context, new))
        start += count
    layout = build_batch_layout(seqs, BLOCK_SIZE, device)
    shape = backend.kv_cache_shape(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    cache = torch.randn(shape, dtype=dtype, device=device)
    tokens = layout.num_tokens
    query = torch.randn(tokens, NUM_HEADS, HEAD_SIZE, dtype=dtype, device=device)
    key = torch.randn(tokens, NUM_KV_HEADS, HEAD_SIZE, dtype=dtype, device=device)
    value = torch.randn_like(key)
    return backend.build_metadata(layout), cache, query, key, value


def kv_bytes(batch: int, context: int, dtype: torch.dtype) -> int:
    return 2 * batch * context * NUM_KV_HEADS * HEAD_SIZE * torch.empty((), dtype=dtype).element_size()


def bench_decode(
    backend: Any, batch: int, context: int, dtype: torch.dtype, device: torch.device, copy_bw: float
) -> dict[str, Any]:
    layer = make_layer()
    metadata, cache, query, key, value = paged_setup(backend, [(context - 1, 1)] * batch, dtype, device)
    paged_ms = bench_ms(lambda: backend.forward(layer, query, key, value, cache, metadata))
    splits = backend.num_splits(metadata, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_SIZE, dtype)
    del cache

    q = torch.randn(batch, NUM_HEADS, 1, HEAD_SIZE, dtype=dtype, device=device)
    k = torch.randn(batch, NUM_KV_HEADS, context, HEAD_SIZE, dtype=dtype, device=device)
    v = torch.randn_like(k)
    sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    read = kv_bytes(batch, context, dtype)
    bandwidth = read / (paged_ms * 1e-3)
    return {
        "batch": batch,
        "context": context,
        "num_splits": splits,
        "paged_ms": paged_ms,
        "sdpa_contiguous_ms": sdpa_ms,
        "time_vs_sdpa": paged_ms / sdpa_ms,
        "bandwidth_gb_s": bandwidth / 1e9,
        "fraction_of_copy_bandwidth": bandwidth / copy_bw,
    }


def bench_prefill(backend: Any, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    layer = make_layer()
    metadata, cache, query, key, value = paged_setup(backend, [(0, length)] * batch, dtype, device)
    paged_ms = bench_ms(lambda: backend.forward(layer, query, key, value, cache, metadata))
    del cache
    q = torch.randn(batch, NUM_HEADS, length, HEAD_SIZE, dtype=dtype, device=device)
    k = torch.randn(batch, NUM_KV_HEADS, length, HEAD_SIZE, dtype=dtype, device=device)
    v = torch.randn_like(k)
    sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    flops = 4 * NUM_HEADS * HEAD_SIZE * batch * length * (length + 1) / 2
    return {
        "batch": batch,
        "length": length,
        "paged_ms": paged_ms,
        "tflops": flops / (paged_ms * 1e-3) / 1e12,
        "sdpa_contiguous_tflops": flops / (sdpa_ms * 1e-3) / 1e12,
        "time_vs_sdpa": paged_ms / sdpa_ms,
    }


def fits(batch: int, context: int, dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * kv_bytes(batch, context, dtype) < MEMORY_SHARE * free


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes (about a minute)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on the CPU, tiny shapes, float32, the kernels under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    from pagedserve.plugins.attention.triton.backend import TritonBackend, interpreting

    if args.dry_run and not interpreting():
        print("--dry-run runs the Triton kernels interpreted: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/attention.py measures GPU kernels and needs a CUDA GPU; none is available "
              "here (torch.cuda.is_available() is False); --dry-run runs it on the CPU.", file=sys.stderr)  # fmt: skip
        return 2

    from pagedserve.bench.report import format_table, write_result

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else getattr(torch, args.dtype)
    torch.manual_seed(0)
    backend = TritonBackend(config=None)
    copy_bw = copy_bandwidth(device)
    batches, contexts, prefills = (
        (QUICK_BATCHES, QUICK_CONTEXTS, QUICK_PREFILLS) if args.quick else (BATCHES, CONTEXTS, PREFILLS)
    )
    if args.dry_run:
        batches, contexts, prefills = (1, 2), (48,), ((1, 32),)
    decode, skipped = [], []
    for batch in batches:
        for context in contexts:
            if not fits(batch, context, dtype, device):
                skipped.append({"batch": batch, "context": context})
                continue
            decode.append(bench_decode(backend, batch, context, dtype, device, copy_bw))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    prefill = [bench_prefill(backend, b, n, dtype, device) for b, n in prefills if fits(b, n, dtype, device)]

    rows: list[tuple[str, Any]] = [("copy bandwidth GB/s (read + write)", copy_bw / 1e9)]
    for r in decode:
        rows.append((
            f"decode b={r['batch']:<3} ctx={r['context']:<5} splits={r['num_splits']:<2}",
            f"{r['paged_ms']:.3f} ms  {r['fraction_of_copy_bandwidth']:.0%} of copy bw  "
            f"{r['time_vs_sdpa']:.2f}x SDPA time",
        ))  # fmt: skip
    for r in prefill:
        rows.append((
            f"prefill b={r['batch']:<3} len={r['length']:<5}",
            f"{r['tflops']:.1f} TFLOP/s (SDPA {r['sdpa_contiguous_tflops']:.1f})  {r['time_vs_sdpa']:.2f}x SDPA time",
        ))  # fmt: skip
    print(format_table(rows))

    target = [r for r in decode if r["batch"] >= 32 and r["context"] >= 4096]
    results = {
        "copy_bandwidth_gb_s": copy_bw / 1e9,
        "decode": decode,
        "prefill": prefill,
        "skipped_for_memory": skipped,
        "target_min_fraction_of_copy_bandwidth": min((r["fraction_of_copy_bandwidth"] for r in target), default=None),
        "max_time_vs_sdpa": max((r["time_vs_sdpa"] for r in decode), default=None),
    }
    settings = {
        "quick": args.quick,
        "dry_run": args.dry_run,
        "dtype": str(dtype).removeprefix("torch."),
        "num_heads": NUM_HEADS,
        "num_kv_heads": NUM_KV_HEADS,
        "head_size": HEAD_SIZE,
        "block_size": BLOCK_SIZE,
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path(__file__).parent / "results" / f"attention-{stamp}.json"
    print(f"wrote {write_result(out, 'attention', settings, results, device.type)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
