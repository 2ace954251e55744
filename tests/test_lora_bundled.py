"""The bundled adapter ``pagedserve/tiny-py-lora-tests``: served by its short name, identical to
transformers + PEFT on the bundled model, and better than the base model on held-out test files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.assets import bundled_adapter_path, bundled_model_path

pytestmark = pytest.mark.slow

ADAPTER = "pagedserve/tiny-py-lora-tests"
FOLDER = bundled_adapter_path(ADAPTER)


def held_out_test_file() -> str:
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from train_lora_adapter import test_files

    return test_files()[1][0].read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("pagedserve/tiny-py", dtype="float32", enable_lora=True, max_lora_rank=8)


def test_the_bundled_adapter_is_what_its_card_says() -> None:
    report = json.loads((FOLDER / "eval.json").read_text())
    perplexity = report["evaluation"]["held_out_test_files_perplexity"]
    assert perplexity["with_adapter"] < perplexity["base"]
    assert str(perplexity["with_adapter"]) in (FOLDER / "README.md").read_text()
    config = json.loads((FOLDER / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "pagedserve/tiny-py" and config["r"] == 8


def test_it_lowers_perplexity_on_a_held_out_test_file(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(held_out_test_file())[:256]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    nll = {}
    for name, lora in (("base", None), ("adapter", LoRARequest("tests", 1, ADAPTER))):
        out = llm.generate([{"prompt_token_ids": ids}], params, lora_request=lora, use_tqdm=False)[0]
        logprobs = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]
        nll[name] = -sum(logprobs) / len(logprobs)
    assert math.exp(nll["adapter"]) < 0.95 * math.exp(nll["base"])


def test_it_matches_transformers_and_peft(llm: LLM) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bundled_model_path("pagedserve/tiny-py"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(FOLDER)).eval()
    prompt = llm.get_tokenizer().encode("import unittest\n\n\nclass TestList(unittest.TestCase):")
    with torch.no_grad():
        # Plain greedy: the model's generation_config.json has sampling defaults (a repetition
        # penalty among them) that transformers would otherwise apply.
        expected = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                  repetition_penalty=1.0, top_p=1.0, temperature=1.0,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    got = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=16),
                       lora_request=LoRARequest("tests", 1, ADAPTER), use_tqdm=False)[0].outputs[0].token_ids
    assert got == expected[: len(got)]
