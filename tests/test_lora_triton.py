"""The Triton LoRA shrink/expand kernels against the torch path (``ops_torch``), interpreted on the
CPU in fp32 and fp16, in the kernel worker (an out-of-bounds load there kills only the child)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from triton_worker import KernelWorker

HERE = __name__
DTYPES = {"float32": torch.float32, "float16": torch.float16}
TOLERANCE = {"float32": 1e-5, "float16": 4e-3}

#: (tokens per request, each request's slot (-1: base model)), max_loras, in, out, stacked rank.
CASES = {
    "decode-mixed": ([1, 1, 1, 1, 1, 1], [0, -1, 2, 0, 1, -1], 3, 64, 128, 24),
    "prefill-and-decode": ([7, 1, 19, 1], [1, -1, 1, 0], 2, 96, 80, 16),
    "all-base": ([3, 2], [-1, -1], 2, 32, 48, 8),
    "odd-sizes": ([5, 3, 1], [2, 0, 1], 4, 40, 70, 6),
}


def case_lora(dtype: str, name: str, seed: int) -> dict[str, float]:
    from pagedserve.plugins.lora import ops_torch, ops_triton
    from pagedserve.plugins.lora.mapping import LoRAMapping

    num_tokens, slots, max_loras, in_features, out_features, rank = CASES[name]
    torch.manual_seed(seed)
    dt = DTYPES[dtype]
    x = torch.randn(sum(num_tokens), in_features).to(dt)
    lora_a = (torch.randn(max_loras, rank, in_features) * 0.2).to(dt)
    lora_b = (torch.randn(max_loras, rank, out_features) * 0.2).to(dt)
    lora_a[:, rank - 2 :] = 0  # the zero padding of adapters below the stacked rank
    base = torch.randn(sum(num_tokens), out_features).to(dt)
    mapping = LoRAMapping.build(slots, num_tokens, torch.device("cpu"))
    in_use = [True] * max_loras
    # The reference: the torch path in fp32 on the same (rounded) inputs.
    expected = ops_torch.add_lora(base.float().clone(), x.float(), lora_a.float(), lora_b.float(), mapping, in_use)
    got = ops_triton.add_lora(base.clone(), x, lora_a, lora_b, mapping, in_use).float()
    base_rows = torch.tensor([s < 0 for s, n in zip(slots, num_tokens) for _ in range(n)])
    return {
        "error": float((got - expected).abs().max() / expected.abs().max()),
        "base_rows_unchanged": bool(torch.equal(got[base_rows], base.float()[base_rows])),
        "changed": float((expected - base.float()).abs().max()),
    }


@pytest.fixture(scope="module")
def worker() -> Iterator[KernelWorker]:
    kernel_worker = KernelWorker()
    yield kernel_worker
    kernel_worker.close()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_triton_lora_matches_the_torch_path(worker: KernelWorker, dtype: str, name: str) -> None:
    result = worker.run(HERE, "lora", dtype=dtype, name=name, seed=len(name))
    print(f"{name} {dtype}: relative error {result['error']:.2e}")
    assert result["error"] <= TOLERANCE[dtype]
    assert result["base_rows_unchanged"]
    if name != "all-base":
        assert result["changed"] > 0.1  # the adapters do something
