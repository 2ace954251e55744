"""The kernels compile for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs kernels as numpy and accepts code the GPU compiler rejects (types changing
in loops, ``tl.dot`` shapes, shared memory). Here each launch wrapper is called on small CPU
tensors with the kernel swapped for a recorder; the recorded arguments give the exact signature,
constants and alignment specialisation the wrapper would launch with, which ``triton.compile``
then builds down to a cubin (Triton's bundled LLVM and ptxas) for the target GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="kernels are interpreted in this process"
)

#: Dynamic shared memory every target has (99 KiB: the sm_86/sm_89 opt-in maximum; A100/H100 have more).
SHARED_MEMORY_LIMIT = 99 * 1024
POINTER_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.float8_e4m3fn: "*fp8e4nv",
}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_recorded(recorder: Recorder, capability: int) -> Any:
    """Compile the recorded launch for ``sm_<capability>``; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    (args, kwargs), = recorder.calls
    kernel = recorder.kernel
    names = kernel.arg_names
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for index, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
            aligned = False
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            aligned = value % 16 == 0
        if aligned:  # as the launcher specialises: 16-byte aligned pointers, multiples of 16
            attrs[(index,)] = [["tt.divisibility", 16]]
    constants = {name: value for name, value in kwargs.items() if name in names}
    signature.update({name: "constexpr" for name in constants})
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def record(monkeypatch: pytest.MonkeyPatch, module: Any, kernel_name: str) -> Recorder:
    recorder = Recorder(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, recorder)
    return recorder


def ptxas_report(ptx: str, capability: int) -> str:
    """ptxas' resource report (registers, spills) for ``ptx``, with the ptxas Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        arch = f"sm_{capability}" + ("a" if capability == 90 else "")
        run = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(source), "-o", str(source.with_suffix(".o"))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return run.stderr


def check_compiled(recorder: Recorder, capability: int) -> None:
    """It compiles to a cubin, fits the shared memory of every target, and spills no registers."""
    compiled = compile_recorded(recorder, capability)
    assert compiled.asm["cubin"]
    report = ptxas_report(compiled.asm["ptx"], capability)
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    assert registers is not None and spills is not None, report
    print(f"sm_{capability}: {registers[1]} registers, {compiled.metadata.shared} bytes of shared memory")
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT
    assert spills[1] == "0", report


@pytest.mark.parametrize(
    ("dtype", "head_size", "group", "query_len", "splits", "window", "fp8", "capability"),
    [
        (torch.float16, 128, 4, 1, 1, None, False, 90),  # Llama-3-8B decode
        (torch.float16, 128, 4, 1, 8, 4096, False, 90),  # split-KV with a window
        (torch.bfloat16, 128, 4, 64, 1, None, False, 80),  # prefill
        (torch.float32, 64, 1, 64, 1, 16, False, 80),  # fp32: IEEE dots, smaller tiles
        (torch.float32, 256, 4, 64, 1, None, False, 80),
        (torch.float32, 256, 4, 1, 4, None, False, 90),
        (torch.float16, 80, 8, 64, 1, None, False, 90),
        (torch.float16, 96, 4, 1, 4, None, False, 90),
        (torch.float16, 256, 2, 64, 1, None, False, 90),
        (torch.bfloat16, 256, 4, 1, 1, None, False, 80),
        (torch.float16, 128, 4, 1, 4, None, True, 90),  # fp8 cache
        (torch.bfloat16, 128, 4, 64, 1, None, True, 90),
    ],
)
def test_attention_compiles(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    head_size: int,
    group: int,
    query_len: int,
    splits: int,
    window: int | None,
    fp8: bool,
    capability: int,
) -> None:
    from pagedserve.plugins.attention.triton import kv_store, paged_attention

    recorder = record(monkeypatch, paged_attention, "_paged_attention_kernel")
    num_kv_heads, block_size = 2, 16
    cache_dtype = kv_store.FP8_DTYPE if fp8 else dtype
    cache = torch.zeros(4, block_size, num_kv_heads, head_size, dtype=cache_dtype)
    query = torch.zeros(query_len, num_kv_heads * group, head_size, dtype=dtype)
    rows = (query_len, num_kv_heads * group, splits)
    partials = (torch.zeros(*rows, head_size), torch.zeros(rows), torch.zeros(rows)) if splits > 1 else None
    paged_attention.paged_attention(
        torch.empty_like(query), query, cache, cache,
        block_tables=torch.zeros(1, 4, dtype=torch.int32),
        query_start_loc=torch.tensor([0, query_len], dtype=torch.int32),
        seq_lens=torch.tensor([query_len], dtype=torch.int32),
        max_query_len=query_len, scale=head_size**-0.5, sliding_window=window,
        kv_scale=torch.ones(2) if fp8 else None, num_splits=splits, partials=partials,
    )  # fmt: skip
    check_compiled(recorder, capability)


@pytest.mark.parametrize(
    ("dtype", "fp8", "capability"),
    [(torch.float16, False, 80), (torch.bfloat16, False, 90), (torch.float32, False, 80), (torch.bfloat16, True, 90)],
)
def test_kv_store_compiles(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, fp8: bool, capability: int) -> None:
    from pagedserve.plugins.attention.triton import kv_store

    recorder = record(monkeypatch, kv_store, "_store_kv_kernel")
    cache = torch.zeros(4, 16, 8, 128, dtype=kv_store.FP8_DTYPE if fp8 else dtype)
    new = torch.zeros(3, 8, 128, dtype=dtype)
    kv_store.store_kv(new, new, cache, cache, torch.arange(3), torch.ones(2) if fp8 else None)
    check_compiled(recorder, capability)


@pytest.mark.parametrize(("dtype", "splits"), [(torch.float16, 32), (torch.float32, 3)])
def test_reduction_compiles(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, splits: int) -> None:
    from pagedserve.plugins.attention.triton import split_kv

    recorder = record(monkeypatch, split_kv, "_reduce_splits_kernel")
    rows = (2, 32, splits)
    out = torch.zeros(2, 32, 128, dtype=dtype)
    split_kv.reduce_splits(out, torch.zeros(*rows, 128), torch.zeros(rows), torch.zeros(rows))
    check_compiled(recorder, 90)
