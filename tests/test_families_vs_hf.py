"""Qwen2, Qwen3, Phi-3, Gemma 2, Mixtral and Qwen3-MoE through the paged cache against
transformers' own forward (fp32): several shapes per family, and each family feature shown to
matter (switched off, the logits no longer match)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_models_vs_hf import run_schedule
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from pagedserve.core.config import ModelConfig
from pagedserve.core.layers.attention import Attention
from pagedserve.core.loader import load_model

PHI3_LONGROPE = {
    "pad_token_id": 2,
    # Shorter than every test sequence: transformers then takes the long factors, as we do.
    "original_max_position_embeddings": 4,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.2, 1.5, 2.0],
        "long_factor": [1.0, 2.0, 4.0, 8.0],
    },
}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
GEMMA2 = {
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 5,  # layer 0 windowed, layer 1 global (Gemma 2's default interleaving)
    "attn_logit_softcapping": 2.0,
    "final_logit_softcapping": 8.0,
}
QWEN3_MOE = {"num_experts": 4, "moe_intermediate_size": 32}


def _attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def no_windows(model: torch.nn.Module) -> None:
    for layer in _attention_layers(model):
        layer.sliding_window = None


def no_attention_soft_cap(model: torch.nn.Module) -> None:
    for layer in _attention_layers(model):
        layer.logits_soft_cap = None


def no_final_soft_cap(model: torch.nn.Module) -> None:
    model.lm_head.soft_cap = None


def no_qk_norm(model: torch.nn.Module) -> None:
    for layer in model.model.layers:
        layer.self_attn.qk_norm = False


def top_1(model: torch.nn.Module) -> None:
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            experts.top_k = 1


Ablation = Callable[[torch.nn.Module], None]
CASES: dict[str, tuple[str, dict, list[Ablation]]] = {
    "qwen2-gqa-qkv-bias": ("Qwen2ForCausalLM", {}, []),
    "qwen2-upper-layers-windowed-tied": (
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1, "tie_word_embeddings": True},
        [no_windows],
    ),
    "qwen3-gqa": ("Qwen3ForCausalLM", {}, [no_qk_norm]),
    "qwen3-mha-yarn": ("Qwen3ForCausalLM", {"num_key_value_heads": 4, "rope_parameters": YARN}, []),
    "phi3-gqa-longrope-partial-rotary": ("Phi3ForCausalLM", PHI3_LONGROPE, []),
    "phi3-mha-window": ("Phi3ForCausalLM", {"pad_token_id": 2, "num_key_value_heads": 4, "sliding_window": 6}, [no_windows]),
    "gemma2-gqa-tied": ("Gemma2ForCausalLM", GEMMA2, [no_windows, no_attention_soft_cap, no_final_soft_cap]),
    "gemma2-mha-untied": ("Gemma2ForCausalLM", {**GEMMA2, "num_key_value_heads": 4, "tie_word_embeddings": False}, []),
    "mixtral-top2-gqa": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}, [top_1]),
    "mixtral-top1-window-tied": (
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 1, "sliding_window": 6, "tie_word_embeddings": True},
        [no_windows],
    ),
    "qwen3moe-top2-renormalized": ("Qwen3MoeForCausalLM", {**QWEN3_MOE, "num_experts_per_tok": 2, "norm_topk_prob": True}, [top_1]),
    "qwen3moe-top1-dense-first-layer": (
        "Qwen3MoeForCausalLM",
        {**QWEN3_MOE, "num_experts_per_tok": 1, "mlp_only_layers": [0], "num_key_value_heads": 1},
        [],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_family_matches_transformers(case: str, tmp_path: Path) -> None:
    architecture, overrides, ablations = CASES[case]
    path = make_tiny_model(tmp_path / case, architecture, **overrides)
    model = load_model(ModelConfig(model=str(path), dtype="float32"), None, "cpu")
    assert type(model).__name__ == architecture
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    rng = random.Random(1)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (5, 19, 9, 12)]
    tokens, logits = run_schedule(model, prompts)
    expected = []
    for seq, ours in zip(tokens, logits):
        with torch.no_grad():
            expected.append(hf_model(torch.tensor([seq[:-1]])).logits[0])
        torch.testing.assert_close(torch.stack(ours), expected[-1], atol=1e-4, rtol=1e-4)
    assert expected[-1].std() > 0.5  # far from uniform, so the comparison means something

    for ablate in ablations:  # each feature matters: without it the same schedule differs
        ablated = load_model(ModelConfig(model=str(path), dtype="float32"), None, "cpu")
        ablate(ablated)
        ablated_tokens, ablated_logits = run_schedule(ablated, prompts)
        worst = max(
            (torch.stack(ours)[: len(want)] - want[: len(ours)]).abs().max().item()
            for ours, want in zip(ablated_logits, expected)
        )
        assert worst > 1e-2, f"{ablate.__name__} did not change {case}'s logits"
