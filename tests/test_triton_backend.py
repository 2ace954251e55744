"""The Triton backend as the engine sees it: registration, selection rules, clear refusals, the
split-KV heuristic, and end-to-end greedy generation (interpreted on the CPU) against torch_ref."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.core.config import CacheConfig, ConfigError, engine_config_from_args
from pagedserve.core.model_runner import select_attention_backend
from pagedserve.core.plugins import get_plugin_manager
from pagedserve.plugins.attention.torch_ref.backend import TorchRefBackend
from pagedserve.plugins.attention.triton import backend as triton_backend
from pagedserve.plugins.attention.triton.backend import TritonBackend
from triton_worker import KernelWorker, on_gpu

HERE = __name__
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "x = 1",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self):",
]


def registry() -> Any:
    return get_plugin_manager().registry("attention_backends")


def cpu_config(**kwargs: Any) -> Any:
    return engine_config_from_args("unused", device="cpu", **kwargs)


def test_registered_above_torch_ref() -> None:
    entry = registry().get("triton")
    assert entry.metadata["priority"] > registry().get("torch_ref").metadata["priority"]
    assert entry.load() is TritonBackend


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="need a CUDA GPU.*TRITON_INTERPRET=1"):
        select_attention_backend(cpu_config(attention_backend="triton"), registry())
    assert select_attention_backend(cpu_config(), registry()) is TorchRefBackend


def test_llm_asking_for_triton_on_cpu_fails_clearly(monkeypatch: pytest.MonkeyPatch, tiny_model) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="attention backend 'triton' cannot run here"):
        LLM(str(tiny_model()), dtype="float32", device="cpu", attention_backend="triton")


def test_interpreter_is_used_only_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_attention_backend(cpu_config(), registry()) is TorchRefBackend
    assert select_attention_backend(cpu_config(attention_backend="triton"), registry()) is TritonBackend


def test_refusals_name_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = cpu_config(attention_backend="triton")
    config.model.hf_config = SimpleNamespace(head_dim=512, hidden_size=4096, num_attention_heads=8)
    assert "head size 512 exceeds 256" in TritonBackend.supports(config)
    monkeypatch.setattr(triton_backend.importlib.util, "find_spec", lambda name: None)
    assert "pip install 'pagedserve[triton]'" in TritonBackend.supports(config)


def test_fp8_cache_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, fp8"):
        CacheConfig(kv_cache_dtype="int8")
    config = cpu_config(kv_cache_dtype="fp8")
    assert config.cache.kv_cache_dtype == "fp8"
    assert "not implemented by the reference backend" in TorchRefBackend.supports(config)
    # On the CPU nothing serves fp8: the error lists every backend's reason.
    with pytest.raises(ConfigError, match="triton: Triton kernels need.*torch_ref: kv_cache_dtype='fp8'"):
        select_attention_backend(config, registry())


def test_fp8_blocks_are_copied_as_bytes() -> None:
    cache = torch.randn(2, 4, 2, 1, 8).to(torch.float8_e4m3fn)
    TritonBackend(config=None).copy_blocks([cache], torch.tensor([[3, 1]]))
    assert torch.equal(cache[:, 1].view(torch.uint8), cache[:, 3].view(torch.uint8))


@pytest.mark.parametrize(
    ("programs", "max_seq_len", "expected"),
    [
        (8, 32768, 32),  # Llama-3-8B, batch 1, 32k: 8 KV-head programs, split to the cap
        (8, 512, 2),  # short context: no more splits than 256-key shares
        (8, 200, 1),  # too short to split
        (40 * 8, 4096, 2),  # batch 32 at 4k: 320 programs, 528 wanted
        (320 * 8, 32768, 1),  # batch 256: already several programs per SM
    ],
)
def test_split_heuristic(programs: int, max_seq_len: int, expected: int) -> None:
    from pagedserve.plugins.attention.triton.split_kv import choose_num_splits

    assert choose_num_splits(programs, max_seq_len, num_sms=132) == expected
    assert choose_num_splits(programs, max_seq_len, num_sms=None) == 1


@pytest.mark.skipif(on_gpu(), reason="the refusal is for machines without CUDA")
def test_benchmark_refuses_to_run_without_cuda() -> None:
    script = Path(__file__).parents[1] / "benchmarks" / "attention.py"
    run = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "needs a CUDA GPU" in run.stderr


# -- end to end, in the kernel worker ------------------------------------------------------------


def case_generate(model_dir: str, max_tokens: int = 12, **engine_args: Any) -> dict[str, Any]:
    """Greedy tokens for PROMPTS, then for a prompt that extends one of them (a prefix-cache
    hit) with two greedy children sharing its blocks copy-on-write."""
    llm = LLM(model_dir, dtype="float32", num_kv_blocks=96, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    forked_params = SamplingParams(temperature=0.0, max_tokens=max_tokens, n=2)
    forked = llm.generate(PROMPTS[1] + "    def load(self):", forked_params, use_tqdm=False)
    runner = llm.engine.runner
    return {
        "tokens": [out.outputs[0].token_ids for out in outputs],
        "forked": [child.token_ids for child in forked[0].outputs],
        "cached_tokens": forked[0].num_cached_tokens,
        "backend": runner.backend.name,
        "kv_cache_dtype": str(runner.kv_caches[0].dtype),
        "kv_scales": [
            None if layer.kv_scale is None else layer.kv_scale.tolist() for layer in runner.attention_layers
        ],
    }


@pytest.fixture(scope="module")
def worker() -> Iterator[KernelWorker]:
    kernel_worker = KernelWorker()
    yield kernel_worker
    kernel_worker.close()


def generate(worker: KernelWorker, model_dir: Path, **engine_args: Any) -> dict[str, Any]:
    device = "cuda" if on_gpu() else "cpu"
    return worker.run(HERE, "generate", model_dir=str(model_dir), device=device, **engine_args)


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize(
    ("architecture", "overrides"),
    [("LlamaForCausalLM", {}), ("MistralForCausalLM", {"sliding_window": 8})],
)
def test_greedy_tokens_match_torch_ref(worker: KernelWorker, tiny_model, architecture: str, overrides: dict) -> None:
    model_dir = tiny_model(architecture, **overrides)
    # A small token budget: long prompts prefill in chunks, mixed with other requests' decodes.
    engine_args = {"max_num_batched_tokens": 24, "max_num_seqs": 4}
    expected = generate(worker, model_dir, attention_backend="torch_ref", **engine_args)
    got = generate(worker, model_dir, attention_backend="triton", **engine_args)
    assert got["backend"] == "triton"
    assert got["tokens"] == expected["tokens"]
    assert got["forked"] == expected["forked"]
    assert got["forked"][0] == got["forked"][1]
    assert got["cached_tokens"] == expected["cached_tokens"] > 0
    print(f"{architecture}: {sum(map(len, got['tokens']))} greedy tokens identical to torch_ref")


@pytest.mark.slow
@pytest.mark.cuda
def test_fp8_cache_end_to_end(worker: KernelWorker, tiny_model) -> None:
    """The runner allocates an fp8 cache with its scales and the backend serves it. Tokens are not
    compared: a random tiny model's near-tied logits flip under fp8 rounding (the kernels'
    fp8 arithmetic is checked against torch in test_triton_kernels)."""
    got = generate(
        worker, tiny_model(), attention_backend="triton", kv_cache_dtype="fp8", max_tokens=4,
        max_num_batched_tokens=24, max_num_seqs=4,  # a small start-up warm-up under the interpreter
    )
    assert got["kv_cache_dtype"] == "torch.float8_e4m3fn"
    assert got["kv_scales"] == [[1.0, 1.0]] * 2  # one per layer: vLLM's default for uncalibrated models
    assert all(got["tokens"])
    assert got["forked"][0] == got["forked"][1]
