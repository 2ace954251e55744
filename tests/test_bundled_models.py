"""The bundled models: the shipped files are the ones trained (manifest checksums), their short
names resolve, their shapes are the promised ones, they reproduce the held-out perplexity recorded
at training time (``scripts/train_tiny_model.py``) and the default one writes Python.

(That greedy decoding through pagedserve equals transformers' on them is in test_engine_vs_hf.py.)"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import pagedserve.assets as assets
from pagedserve import LLM, SamplingParams
from pagedserve.assets import (
    ASSETS_DIR,
    BUNDLED_MODELS,
    DEFAULT_MODEL,
    DRAFT_MODEL,
    MANIFEST_PATH,
    MISTRAL_MODEL,
    forward_flops_per_token,
)
from pagedserve.assets.corpus import eval_windows, split_files, token_stream
from pagedserve.core.loader import ModelLoadError, resolve_model_path

MANIFEST: dict[str, Any] = json.loads(MANIFEST_PATH.read_text())
FOLDERS = list(BUNDLED_MODELS.values())
TARGET, DRAFT, MISTRAL = (BUNDLED_MODELS[name] for name in (DEFAULT_MODEL, DRAFT_MODEL, MISTRAL_MODEL))


def config(folder: str) -> Any:
    return AutoConfig.from_pretrained(ASSETS_DIR / folder)


@pytest.mark.parametrize("folder", FOLDERS)
def test_shipped_files_match_the_recorded_checksums(folder: str) -> None:
    shipped = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ASSETS_DIR / folder).iterdir() if p.is_file()
    }
    assert shipped == MANIFEST["models"][folder]["files"]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert name in shipped


@pytest.mark.parametrize("folder", FOLDERS)
def test_weights_are_half_precision_and_the_shape_is_the_recorded_one(folder: str) -> None:
    with safe_open(str(ASSETS_DIR / folder / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 - not a mapping
        assert {t.get_dtype() for t in tensors.values()} == {"F16"}
        parameters = sum(math.prod(t.get_shape()) for t in tensors.values())
    entry = MANIFEST["models"][folder]
    assert parameters == entry["parameters"]
    hf_config = config(folder)
    assert hf_config.architectures == [entry["architecture"]]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(hf_config, key) == entry["settings"][key]


def test_the_target_is_a_gqa_llama_whose_linear_sizes_suit_group_size_128() -> None:
    hf_config = config(TARGET)
    assert hf_config.architectures == ["LlamaForCausalLM"]
    assert 2_000_000 <= MANIFEST["models"][TARGET]["parameters"] <= 10_000_000
    assert hf_config.num_key_value_heads < hf_config.num_attention_heads
    q_size = hf_config.num_attention_heads * hf_config.head_dim
    kv_size = hf_config.num_key_value_heads * hf_config.head_dim
    for size in (hf_config.hidden_size, hf_config.intermediate_size, q_size, kv_size):
        assert size % 128 == 0


def test_the_mistral_variant_has_a_window_shorter_than_its_context() -> None:
    hf_config = config(MISTRAL)
    assert hf_config.architectures == ["MistralForCausalLM"]
    assert hf_config.sliding_window < hf_config.max_position_embeddings


def test_the_draft_shares_the_tokenizer_and_costs_at_most_an_eighth() -> None:
    assert (ASSETS_DIR / DRAFT / "tokenizer.json").read_bytes() == (ASSETS_DIR / TARGET / "tokenizer.json").read_bytes()
    draft, target = config(DRAFT), config(TARGET)
    assert draft.vocab_size == target.vocab_size
    for context in (0, 128, target.max_position_embeddings):
        assert forward_flops_per_token(draft, context) * 8 <= forward_flops_per_token(target, context)


def test_the_assets_stay_small() -> None:
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert total < 40 * 2**20


def test_short_names_resolve_to_the_bundled_folders() -> None:
    assert DEFAULT_MODEL == "pagedserve/tiny-py"
    for name, folder in BUNDLED_MODELS.items():
        assert Path(resolve_model_path(name)) == ASSETS_DIR / folder


def test_a_local_folder_of_the_same_name_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / DEFAULT_MODEL).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(DEFAULT_MODEL) == DEFAULT_MODEL


def test_a_bundled_model_missing_from_the_installation_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="missing from this installation"):
        resolve_model_path(DRAFT_MODEL)


def held_out_slice(folder: str) -> list[list[int]]:
    """The first held-out windows, rebuilt from this interpreter's stdlib by the recorded rule."""
    evaluation = MANIFEST["evaluation"]
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / folder)
    _, held_out = split_files()
    stream = token_stream(
        lambda text: tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids,
        held_out,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    windows = eval_windows(stream, evaluation["context"])[: evaluation["slice_windows"]]
    digest = hashlib.sha256(json.dumps(windows).encode()).hexdigest()
    trained_on = MANIFEST["versions"]["python"]
    if digest != evaluation["slice_ids_sha256"] and platform.python_version() != trained_on:
        pytest.skip(f"this interpreter's stdlib differs from the one the models were trained on (Python {trained_on})")
    assert digest == evaluation["slice_ids_sha256"]
    return windows


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS)
def test_the_shipped_weights_reproduce_the_recorded_held_out_perplexity(folder: str) -> None:
    windows = held_out_slice(folder)
    model = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / folder, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=torch.tensor([window])).logits[0, :-1].float()
            log_probs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(window[1:])[:, None])
            nll -= log_probs.double().sum().item()
    recorded = MANIFEST["models"][folder]["evaluation"]
    perplexity = math.exp(nll / sum(len(w) - 1 for w in windows))
    assert perplexity == pytest.approx(recorded["slice_perplexity"], rel=1e-3)
    # The whole held-out split, as recorded: far below the unigram baseline on the same tokenizer.
    assert recorded["held_out_perplexity"] < MANIFEST["tokenizer"]["unigram_perplexity"] / 4


@pytest.mark.slow
def test_the_default_model_writes_python() -> None:
    llm = LLM(DEFAULT_MODEL, dtype="float32")
    text = llm.generate("def fibonacci(n):", SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)[0].outputs[0].text
    assert "\n    " in text  # an indented body
    assert any(keyword in text for keyword in ("return", "if ", "for ", "while "))


def test_the_default_sampling_is_a_measured_setting_that_does_not_loop() -> None:
    """generation_config.json's sampling defaults are one of the settings the card's table measured
    (scripts/eval_tiny_model.py): under them at most half as many completions as under greedy
    decoding repeat a line 3 times in a row, and most chat answers to "Write a function that ..."
    parse."""
    defaults = json.loads((ASSETS_DIR / TARGET / "generation_config.json").read_text())
    chosen = {k: defaults[k] for k in ("temperature", "top_p", "repetition_penalty")}
    results = {json.dumps(r["setting"], sort_keys=True): r for r in MANIFEST["models"][TARGET]["output_eval"]["results"]}
    measured = results[json.dumps(chosen, sort_keys=True)]
    greedy = results[json.dumps({"temperature": 0.0})]
    assert measured["completion_repeats_a_line_3x"] <= greedy["completion_repeats_a_line_3x"] / 2
    assert measured["chat_repeats_a_line_3x"] <= greedy["chat_repeats_a_line_3x"] / 2
    assert measured["chat_parses"] > 0.5
    assert str(defaults["repetition_penalty"]) in (ASSETS_DIR / TARGET / "README.md").read_text()


@pytest.mark.slow
def test_the_default_model_answers_a_request_for_a_function_with_one() -> None:
    llm = LLM(DEFAULT_MODEL, dtype="float32")
    messages = [[{"role": "user", "content": "Write a function that returns the factorial of n."}]]
    answer = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=96), use_tqdm=False)[0].outputs[0].text
    assert answer.startswith("def ")
    assert "\n    " in answer
