"""The quantization Triton kernels against the torch path, as a script: the tests run it in a
subprocess with ``TRITON_INTERPRET=1`` (an out-of-bounds access there kills the process, not the
test session), and natively on a GPU. Prints one line per case; exits 1 if any fails."""

from __future__ import annotations

import sys

import torch

from pagedserve.plugins.quant import triton_fp8, triton_int_gemm
from pagedserve.plugins.quant.int_linear import dequantize_packed
from pagedserve.plugins.quant.packing import pack_int32

#: (bits, K, N, group size, M, split-K or None for the heuristic)
GEMM_CASES = [
    (4, 128, 96, 32, 1, None),
    (4, 256, 72, 128, 5, 2),
    (4, 128, 64, 64, 33, 3),
    (8, 128, 136, 32, 17, None),
    (8, 64, 64, 64, 70, 1),
    (4, 96, 40, 96, 2, None),  # one group of all K (group size -1)
    (4, 72, 16, 24, 3, None),  # a group no K tile fits: the dequantize fallback
]


def check(name: str, got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> bool:
    try:
        torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)
    except AssertionError as exc:
        print(f"FAIL {name}: {exc}")
        return False
    print(f"ok   {name}")
    return True


def main(device: str) -> int:
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    generator = torch.Generator().manual_seed(0)
    ok = True
    for bits, K, N, group, M, split in GEMM_CASES:
        values = torch.randint(0, 1 << bits, (K, N), generator=generator)
        zeros = torch.randint(0, 1 << bits, (K // group, N), generator=generator)
        qweight, qzeros = pack_int32(values, bits, 0).to(device), pack_int32(zeros, bits, 1).to(device)
        for dtype in dtypes:
            scales = (torch.rand(K // group, N, generator=generator) / (1 << bits)).to(dtype).to(device)
            x = torch.randn(M, K, generator=generator).to(dtype).to(device)
            dense = dequantize_packed(qweight, qzeros, scales.float(), bits, group)
            tol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
            name = f"{bits}-bit K={K} N={N} g={group} M={M} split={split} {dtype}"
            fused = triton_int_gemm.fused_matmul(x, qweight, qzeros, scales, bits, group, split_k=split)
            ok &= fused.dtype == dtype and check(f"fused {name}", fused, x.float() @ dense, *tol)
            weight = triton_int_gemm.dequantize(qweight, qzeros, scales, bits, group, dtype)
            ok &= check(f"dequantize {name}", weight, dense.to(dtype), 0, 0)
    for M, K in [(1, 64), (5, 100), (3, 2048)]:
        x = (torch.randn(M, K, generator=generator) * 3).to(device)
        scaled, scale = triton_fp8.per_token_scale(x)
        expected_scale = x.abs().amax(-1, keepdim=True) / triton_fp8.FP8_MAX
        ok &= check(f"fp8 per-token scale M={M} K={K}", scale, expected_scale, 1e-6, 0)
        ok &= check(f"fp8 per-token scaled M={M} K={K}", scaled, (x / expected_scale).clamp(-448, 448), 1e-5, 1e-5)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
