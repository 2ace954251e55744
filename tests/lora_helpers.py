"""PEFT adapters made by the ``peft`` library itself for the LoRA tests, and PEFT's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def make_peft_adapter(
    model_dir: Path, out_dir: Path, seed: int, r: int = 4, target_modules: Any = "all-linear",
    scale: float = 0.1, **config: Any,
) -> Path:
    """A LoRA adapter of the model in ``model_dir``, saved by PEFT, with A and B random (PEFT
    initialises B to zero, which would make every adapter the base model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora_config = LoraConfig(r=r, target_modules=target_modules, lora_dropout=0.0, **config)
    model = get_peft_model(base, lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def edit_adapter_config(adapter_dir: Path, **changes: Any) -> None:
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


class PeftOracle:
    """transformers + PEFT with several adapters loaded: greedy tokens and their logprobs."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()

    @torch.no_grad()
    def greedy(self, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy continuation and the logprob of each chosen token (one forward per token on
        the whole sequence, so no cache is involved)."""
        ids = list(prompt_ids)
        tokens, logprobs = [], []
        context = self.model.disable_adapter() if adapter is None else _nullcontext()
        if adapter is not None:
            self.model.set_adapter(adapter)
        with context:
            for _ in range(max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                ids.append(token)
        return tokens, logprobs


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None
