"""The two checkpoints of the peer benchmark, written as float32 safetensors folders that every
system reads (pagedserve and transformers directly, llama.cpp after its GGUF converter,
CTranslate2 after its transformers converter):

- ``tiny-py``: the bundled model (pagedserve/tiny-py), upcast to float32;
- ``smollm-135m-shape``: SmolLM-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
  intermediate 1536, vocab 49152, tied embeddings) with random weights and the bundled
  tokenizer (its ids past 4096 are padding tokens to the converters; the workload is token ids).

Usage: python benchmarks/peers/models.py OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import transformers

from pagedserve.assets import bundled_model_path

SMOLLM_135M_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.04,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_models(out: Path) -> dict[str, Path]:
    bundled = Path(bundled_model_path("pagedserve/tiny-py"))
    folders = {"tiny-py": out / "tiny-py", "smollm-135m-shape": out / "smollm-135m-shape"}
    if not (folders["tiny-py"] / "model.safetensors").exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(bundled, dtype=torch.float32)
        model.save_pretrained(folders["tiny-py"])
    if not (folders["smollm-135m-shape"] / "model.safetensors").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SMOLLM_135M_SHAPE)
        transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(folders["smollm-135m-shape"])
    for folder in folders.values():
        for name in TOKENIZER_FILES:
            shutil.copy(bundled / name, folder / name)
    return folders


if __name__ == "__main__":
    for name, folder in write_models(Path(sys.argv[1])).items():
        print(name, folder)
