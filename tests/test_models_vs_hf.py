"""Llama and Mistral through the paged cache against transformers' own forward (fp32)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from pagedserve.core.config import ModelConfig
from pagedserve.core.forward_context import build_batch_layout, set_forward_context
from pagedserve.core.layers.attention import Attention
from pagedserve.core.loader import load_model
from pagedserve.plugins.attention.torch_ref.backend import TorchRefBackend

BLOCK_SIZE = 4
NUM_BLOCKS = 48
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama-mha-tied": ("LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-mqa-biases": (
        "LlamaForCausalLM",
        {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
    ),
    "llama-llama3-rope": ("LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": (
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "llama-explicit-head-dim": ("LlamaForCausalLM", {"head_dim": 32}),
    "mistral-sliding-window": ("MistralForCausalLM", {"sliding_window": 5}),
}


class PagedRunner:
    """Drives a model step by step through the paged cache, as the engine's runner would."""

    def __init__(self, model: torch.nn.Module, seed: int = 0) -> None:
        self.model = model
        self.backend = TorchRefBackend(config=None)
        for layer in model.modules():
            if isinstance(layer, Attention):
                shape = self.backend.kv_cache_shape(
                    NUM_BLOCKS, BLOCK_SIZE, layer.num_kv_heads, layer.head_size
                )
                # Large finite garbage in unused slots: any read outside the mask would show.
                layer.kv_cache = torch.randn(shape) * 1e3
        self.free_blocks = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free_blocks)
        self.blocks: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}

    def step(self, tokens: list[list[int]], new: dict[int, int]) -> dict[int, torch.Tensor]:
        """Run ``new[request] = number of its next tokens``; returns each one's logits."""
        seqs, input_ids = [], []
        for req, count in new.items():
            start = self.computed.get(req, 0)
            blocks = self.blocks.setdefault(req, [])
            while len(blocks) * BLOCK_SIZE < start + count:
                blocks.append(self.free_blocks.pop())
            seqs.append((blocks, start, count))
            input_ids += tokens[req][start : start + count]
            self.computed[req] = start + count
        layout = build_batch_layout(seqs, BLOCK_SIZE, "cpu")
        with torch.no_grad(), set_forward_context(self.backend, self.backend.build_metadata(layout)):
            hidden = self.model(torch.tensor(input_ids), layout.positions)
            logits = self.model.compute_logits(hidden)
        return dict(zip(new, logits.split(list(new.values()))))


def run_schedule(model: torch.nn.Module, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Chunked and whole prefills mixed with greedy decodes; returns sequences and their logits."""
    runner = PagedRunner(model)
    tokens = [list(p) for p in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]

    def record(out: dict[int, torch.Tensor]) -> None:
        for req, rows in out.items():
            logits[req].append(rows)
            if runner.computed[req] == len(tokens[req]):
                tokens[req].append(int(rows[-1].argmax()))

    first_chunk = len(prompts[1]) // 2
    record(runner.step(tokens, {0: len(prompts[0]), 1: first_chunk, 2: len(prompts[2])}))
    record(
        runner.step(tokens, {0: 1, 1: len(prompts[1]) - first_chunk, 2: 1, 3: len(prompts[3])})
    )
    for _ in range(3):
        record(runner.step(tokens, {req: 1 for req in range(len(prompts))}))
    return tokens, [list(torch.cat(rows).unbind()) for rows in logits]


@pytest.mark.parametrize("case", sorted(CASES))
def test_paged_model_matches_transformers(case: str, tmp_path: Path) -> None:
    architecture, overrides = CASES[case]
    path = make_tiny_model(tmp_path / case, architecture, **overrides)
    model = load_model(ModelConfig(model=str(path), dtype="float32"), None, "cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    rng = random.Random(1)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (5, 19, 9, 12)]
    tokens, logits = run_schedule(model, prompts)

    for seq, ours in zip(tokens, logits):
        with torch.no_grad():
            expected = hf_model(torch.tensor([seq[:-1]])).logits[0]
        torch.testing.assert_close(torch.stack(ours), expected, atol=1e-4, rtol=1e-4)
    # Random logits that are near-uniform would make the comparison above meaningless.
    assert expected.std() > 0.5


def test_sliding_window_changes_the_output(tmp_path: Path) -> None:
    """The window is really applied: the same weights without it give other logits."""
    windowed = make_tiny_model(tmp_path / "w", "MistralForCausalLM", sliding_window=5)
    full = make_tiny_model(tmp_path / "f", "MistralForCausalLM", sliding_window=None)
    prompt = [list(range(3, 40, 3))]
    outputs = []
    for path in (windowed, full):
        model = load_model(ModelConfig(model=str(path)), None, "cpu")
        runner = PagedRunner(model)
        outputs.append(runner.step(prompt, {0: len(prompt[0])})[0])
    torch.testing.assert_close(outputs[0][:5], outputs[1][:5])
    assert not torch.allclose(outputs[0][-1], outputs[1][-1], atol=1e-3)
