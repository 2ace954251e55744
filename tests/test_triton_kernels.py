"""The Triton kernels against the torch reference (torch_ref), interpreted on the CPU.

Every case runs in the kernel worker (``triton_worker.py``): it writes each request's context into
a paged cache (shuffled block ids, unused slots NaN), stores the step's new K/V and attends, once
with the Triton backend and once with torch_ref on a float32 copy; it returns the relative error
(max |out - ref| / max |ref|), printed in the test output (``-rA``), and whether the caches match.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from triton_worker import KernelWorker

HERE = __name__
# Natively on a GPU when there is one (the workers pick CUDA), else under the interpreter.
pytestmark = pytest.mark.cuda
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Max |out - ref| / max |ref| against torch_ref in float32 over the same (rounded) inputs.
TOLERANCE = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}

#: (contexts already cached, new tokens) per request.
SHAPES = {
    "decode": ([5, 16, 1, 33, 70], [1, 1, 1, 1, 1]),
    "prefill": ([0, 0, 0], [7, 1, 40]),
    "mixed": ([0, 9, 37, 4, 20], [23, 1, 5, 1, 17]),
    "prefix-hit": ([16, 32, 48], [9, 3, 30]),
    "partial-blocks": ([3, 19, 45], [1, 6, 2]),
}
#: Long contexts for the split-KV path (several key tiles per split).
LONG_DECODE = ([300, 17, 129], [1, 1, 1])
NUM_KV_HEADS = 2


@dataclass
class Batch:
    """One step: per request (block ids, cached tokens, new tokens); the new tokens' query, key
    and value; a paged cache holding every context (unused slots NaN, or 0 when fp8)."""

    seqs: list[tuple[list[int], int, int]]
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: torch.Tensor


def _on_fp8_grid(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def make_batch(
    shape: str, num_heads: int, num_kv_heads: int, head_size: int, block_size: int, dtype: torch.dtype,
    fp8_scales: tuple[float, float] | None, seed: int,
) -> Batch:  # fmt: skip
    rng = random.Random(seed)
    torch.manual_seed(seed)
    contexts, new_tokens = LONG_DECODE if shape == "long-decode" else SHAPES[shape]
    num_blocks = sum(math.ceil((c + n) / block_size) for c, n in zip(contexts, new_tokens)) + 3
    cache_shape = (2, num_blocks, block_size, num_kv_heads, head_size)
    if fp8_scales is None:
        cache = torch.full(cache_shape, float("nan"), dtype=dtype)
        scales = (1.0, 1.0)
    else:
        cache = torch.zeros(cache_shape, dtype=torch.float8_e4m3fn)
        scales = fp8_scales
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs, queries, keys, values = [], [], [], []
    for context, new in zip(contexts, new_tokens):
        blocks = [free.pop() for _ in range(math.ceil((context + new) / block_size))]
        k = torch.randn(context + new, num_kv_heads, head_size)
        v = torch.randn(context + new, num_kv_heads, head_size)
        if fp8_scales is not None:
            # Values on the fp8 grid: the interpreter's fp32 -> fp8 cast drops the carry when
            # rounding up crosses a power of two (1.96 -> 1.0), a bug GPUs do not have. One new
            # key and one new value beyond the fp8 range check the saturation.
            k, v = _on_fp8_grid(k, scales[0]), _on_fp8_grid(v, scales[1])
            k[-1, 0, 0], v[-1, -1, -1] = 1000.0, -1000.0
        for pos in range(context):  # the context is already in the cache
            block, offset = blocks[pos // block_size], pos % block_size
            cache[0, block, offset] = (k[pos] / scales[0]).to(cache.dtype)
            cache[1, block, offset] = (v[pos] / scales[1]).to(cache.dtype)
        seqs.append((blocks, context, new))
        queries.append(torch.randn(new, num_heads, head_size))
        keys.append(k[context:])
        values.append(v[context:])
    return Batch(seqs, torch.cat(queries).to(dtype), torch.cat(keys).to(dtype), torch.cat(values).to(dtype), cache)


def run_triton(batch: Batch, layer: Any, block_size: int, num_splits: int | None, device: str) -> torch.Tensor:
    """The step through the Triton backend, or with ``num_splits`` through the kernels directly
    (a forced split count); writes the new K/V into ``batch.cache``, returns the output."""
    from pagedserve.core.forward_context import build_batch_layout
    from pagedserve.plugins.attention.triton import kv_store, paged_attention, split_kv
    from pagedserve.plugins.attention.triton.backend import TritonBackend

    layout = build_batch_layout(batch.seqs, block_size, device)
    query, key, value, cache = (t.to(device) for t in (batch.query, batch.key, batch.value, batch.cache))
    kv_scale = getattr(layer, "kv_scale", None)
    if num_splits is None:
        backend = TritonBackend(config=None)
        out = backend.forward(layer, query, key, value, cache, backend.build_metadata(layout))
    else:
        kv_store.store_kv(key, value, cache[0], cache[1], layout.slot_mapping, kv_scale)
        out = torch.empty_like(query)
        rows = (layout.num_tokens, layer.num_heads, num_splits)
        partials = tuple(torch.empty(shape, device=device) for shape in ((*rows, layer.head_size), rows, rows))
        paged_attention.paged_attention(
            out, query, cache[0], cache[1], layout.block_tables, layout.query_start_loc, layout.seq_lens,
            layout.max_query_len, layer.scale, layer.sliding_window, kv_scale,
            num_splits, partials if num_splits > 1 else None, layer.logits_soft_cap,
        )  # fmt: skip
        if num_splits > 1:
            split_kv.reduce_splits(out, *partials)
    batch.cache.copy_(cache.cpu())
    return out.cpu()


def case_attention(
    shape: str,
    group: int,
    dtype: str,
    head_size: int = 64,
    block_size: int = 16,
    window: int | None = None,
    num_splits: int | None = None,
    fp8_scales: tuple[float, float] | None = None,
    num_kv_heads: int = NUM_KV_HEADS,
    seed: int = 0,
    soft_cap: float | None = None,
) -> dict[str, Any]:
    """One step through Triton and through torch_ref (float32, same inputs): relative error and
    whether both stored the same K/V."""
    from pagedserve.core.forward_context import build_batch_layout
    from pagedserve.core.layers.attention import Attention
    from pagedserve.plugins.attention.torch_ref.backend import TorchRefBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_heads = num_kv_heads * group
    batch = make_batch(shape, num_heads, num_kv_heads, head_size, block_size, DTYPES[dtype], fp8_scales, seed)
    layer = Attention(
        num_heads, head_size, head_size**-0.5, num_kv_heads, sliding_window=window, logits_soft_cap=soft_cap
    )
    if fp8_scales is not None:
        layer.kv_scale = torch.tensor(fp8_scales, dtype=torch.float32, device=device)
    # Before Triton stores into batch.cache. The Triton kernels must never read the unused (NaN)
    # slots; torch_ref relies on them being finite, as in the runner's zero-filled cache.
    reference_cache = batch.cache.float().nan_to_num(0.0)
    out = run_triton(batch, layer, block_size, num_splits, device)

    layout = build_batch_layout(batch.seqs, block_size, "cpu")
    ref_key, ref_value = batch.key.float(), batch.value.float()
    result: dict[str, Any] = {}
    if fp8_scales is not None:
        # torch_ref attends over what the kernel stored, dequantised; the store itself is
        # checked against torch's saturating cast.
        new = torch.stack([ref_key / fp8_scales[0], ref_value / fp8_scales[1]])
        expected = new.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        stored = batch.cache.flatten(1, 2)[:, layout.slot_mapping]
        result["fp8_codes_off"] = int((stored.view(torch.uint8) != expected.view(torch.uint8)).sum())
        scales = torch.tensor(fp8_scales).view(2, 1, 1, 1, 1)
        reference_cache = batch.cache.float() * scales
        ref_key, ref_value = (reference_cache[i].flatten(0, 1)[layout.slot_mapping] for i in (0, 1))
    reference = TorchRefBackend(config=None)
    expected_out = reference.forward(
        layer, batch.query.float(), ref_key, ref_value, reference_cache, reference.build_metadata(layout)
    )
    if fp8_scales is None:  # torch_ref stored float32 copies of the same values
        result["cache_equal"] = torch.equal(batch.cache.float().nan_to_num(0.0), reference_cache)
    if window is not None:  # the window must matter in this batch, or the test proves nothing
        full = Attention(num_heads, head_size, layer.scale, num_kv_heads, logits_soft_cap=soft_cap)
        unwindowed = reference.forward(full, batch.query.float(), ref_key, ref_value, reference_cache,
                                       reference.build_metadata(layout))  # fmt: skip
        result["window_effect"] = (unwindowed - expected_out).abs().max().item()
    if soft_cap is not None:  # likewise the cap
        uncapped = Attention(num_heads, head_size, layer.scale, num_kv_heads, sliding_window=window)
        plain = reference.forward(uncapped, batch.query.float(), ref_key, ref_value, reference_cache,
                                  reference.build_metadata(layout))  # fmt: skip
        result["cap_effect"] = (plain - expected_out).abs().max().item()
    diff = (out.float() - expected_out).abs().max().item()
    result["max_abs_err"] = diff
    result["rel_err"] = diff / expected_out.abs().max().item()
    result["finite"] = bool(torch.isfinite(out).all())
    return result


@pytest.fixture(scope="module")
def worker() -> Iterator[KernelWorker]:
    kernel_worker = KernelWorker()
    yield kernel_worker
    kernel_worker.close()


def check(worker: KernelWorker, dtype: str, **case: Any) -> dict[str, Any]:
    result = worker.run(HERE, "attention", dtype=dtype, **case)
    print(f"{case} {dtype}: rel_err={result['rel_err']:.2e} max_abs_err={result['max_abs_err']:.2e}")
    assert result["finite"]
    assert result["rel_err"] < TOLERANCE[dtype]
    if "cache_equal" in result:
        assert result["cache_equal"], "the stored K/V differ from torch_ref's"
    return result


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_batch_shapes(worker: KernelWorker, shape: str, group: int, dtype: str) -> None:
    check(worker, dtype, shape=shape, group=group, seed=group)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("window", [8, 40])
@pytest.mark.parametrize("shape", ["mixed", "decode"])
def test_sliding_window(worker: KernelWorker, shape: str, window: int, dtype: str) -> None:
    assert check(worker, dtype, shape=shape, group=4, window=window)["window_effect"] > 0.1


@pytest.mark.parametrize(
    ("dtype", "shape", "window", "num_splits"),
    [("float32", "mixed", None, None), ("float16", "decode", 8, None), ("float32", "long-decode", None, 3)],
)
def test_soft_cap(worker: KernelWorker, dtype: str, shape: str, window: int | None, num_splits: int | None) -> None:
    result = check(worker, dtype, shape=shape, group=4, window=window, soft_cap=1.5, num_splits=num_splits)
    assert result["cap_effect"] > 0.05


@pytest.mark.parametrize("head_size", [80, 96, 128, 256])
def test_head_sizes(worker: KernelWorker, head_size: int) -> None:
    check(worker, "float16", shape="mixed", group=4, head_size=head_size)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_block_size_32(worker: KernelWorker, dtype: str) -> None:
    check(worker, dtype, shape="mixed", group=4, block_size=32)


def test_multi_query(worker: KernelWorker) -> None:
    check(worker, "float16", shape="mixed", group=8, num_kv_heads=1)


@pytest.mark.parametrize("shape", ["mixed", "decode"])
def test_bfloat16(worker: KernelWorker, shape: str) -> None:
    check(worker, "bfloat16", shape=shape, group=4)


@pytest.mark.parametrize(
    ("dtype", "num_splits", "window", "shape"),
    [
        ("float32", 1, None, "long-decode"),
        ("float32", 3, None, "long-decode"),
        ("float16", 8, None, "long-decode"),
        ("float32", 5, 30, "long-decode"),
        ("float32", 4, None, "mixed"),
    ],
)
def test_split_kv(worker: KernelWorker, dtype: str, num_splits: int, window: int | None, shape: str) -> None:
    result = check(worker, dtype, shape=shape, group=4, num_splits=num_splits, window=window)
    assert window is None or result["window_effect"] > 0.1


@pytest.mark.parametrize(("dtype", "num_splits"), [("float32", None), ("float16", None), ("float16", 3)])
def test_fp8_cache(worker: KernelWorker, dtype: str, num_splits: int | None) -> None:
    result = check(worker, dtype, shape="mixed", group=4, fp8_scales=(0.5, 0.25), num_splits=num_splits)
    assert result["fp8_codes_off"] == 0, "the fp8 store differs from torch's saturating cast"
