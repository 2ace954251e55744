"""KV sizing by measurement: the runner's profile step at the largest batch, read through
allocator statistics (faked here on the CPU), gives ``total x gpu_memory_utilization - others -
weights - activation peak``, and the start-up log prints each term."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedserve import LLM
from pagedserve.core import runner_start

MIB = 2**20


class FakeAllocator:
    """A 64 MiB device (small: the CPU allocates the cache it sizes) with 4 MiB used outside this
    process's tensors and 8 MiB of weights. Between a reset and the next read of the peak, it
    counts as allocated every tensor a module returns (a forward hook on every module), so the
    peak grows with the step the runner profiles."""

    total = 64 * MIB
    others = 4 * MIB
    weights = 8 * MIB

    def __init__(self) -> None:
        self.peak = 0
        self.widest = 0  # the most rows (tokens) of a tensor seen in the window
        self.reset_calls = 0
        self.recording = False
        self._hook = torch.nn.modules.module.register_module_forward_hook(self._seen)

    def _seen(self, module, args, output) -> None:
        if self.recording and isinstance(output, torch.Tensor) and output.dim():
            self.peak += output.numel() * output.element_size()
            self.widest = max(self.widest, output.shape[0])

    def close(self) -> None:
        self._hook.remove()

    def mem_get_info(self) -> tuple[int, int]:
        return self.total - self.others - self.weights, self.total

    def memory_reserved(self) -> int:
        return self.weights

    def memory_allocated(self) -> int:
        return self.weights

    def max_memory_allocated(self) -> int:
        self.recording = False
        return self.weights + self.peak

    def reset_peak_memory_stats(self) -> None:
        self.reset_calls += 1
        self.peak = self.widest = 0
        self.recording = True


@pytest.fixture
def fake_allocator(monkeypatch):
    fakes: list[FakeAllocator] = []

    def stats(device):
        fakes.append(FakeAllocator())
        return fakes[-1]

    monkeypatch.setattr(runner_start, "allocator_stats", stats)
    yield fakes
    for fake in fakes:
        fake.close()


def _blocks(fake: FakeAllocator, utilization: float, per_block: int) -> int:
    return (int(fake.total * utilization) - fake.others - fake.weights - fake.peak) // per_block


def test_kv_cache_takes_what_the_measured_peak_leaves(tiny_model, fake_allocator, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pagedserve.core.runner_start")
    small = LLM(str(tiny_model()), dtype="float32", max_num_batched_tokens=64, max_num_seqs=8,
                gpu_memory_utilization=0.5)
    fake = fake_allocator[-1]
    per_block = small.engine.runner._bytes_per_block()
    assert fake.reset_calls == 1 and fake.widest == 64  # the profile step ran at the largest batch
    assert small.engine.runner.num_kv_blocks == _blocks(fake, 0.5, per_block)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    for term in ("0.5 x 64 MiB total", "4 MiB used outside", "8 MiB weights",
                 "activation peak (measured)", f"{small.engine.runner.num_kv_blocks} blocks"):
        assert term in line
    # A step of 8x the tokens peaks higher and leaves fewer blocks.
    large = LLM(str(tiny_model()), dtype="float32", max_num_batched_tokens=512, max_num_seqs=8,
                gpu_memory_utilization=0.5)
    assert fake_allocator[-1].widest == 512 and fake_allocator[-1].peak > fake.peak
    assert large.engine.runner.num_kv_blocks == _blocks(fake_allocator[-1], 0.5, per_block)
    assert large.engine.runner.num_kv_blocks < small.engine.runner.num_kv_blocks
    # The profile's temporary cache is gone; the real one is bound and zeroed.
    runner = large.engine.runner
    assert all(layer.kv_cache is kv for layer, kv in zip(runner.attention_layers, runner.kv_caches))
    assert runner.kv_caches[0].shape[1] == runner.num_kv_blocks and not runner.kv_caches[0].any()


def test_a_configured_size_is_not_profiled(tiny_model, fake_allocator) -> None:
    LLM(str(tiny_model()), dtype="float32", num_kv_blocks=32)
    LLM(str(tiny_model()), dtype="float32", kv_cache_memory_bytes=1 << 20)
    assert all(fake.reset_calls == 0 for fake in fake_allocator)


def test_no_room_left_is_a_clear_error(tiny_model, monkeypatch) -> None:
    class Full(FakeAllocator):
        weights = 63 * MIB

    full = Full()
    monkeypatch.setattr(runner_start, "allocator_stats", lambda device: full)
    try:
        with pytest.raises(ValueError, match="holds no block"):
            LLM(str(tiny_model()), dtype="float32", max_num_batched_tokens=64, max_num_seqs=8)
    finally:
        full.close()
