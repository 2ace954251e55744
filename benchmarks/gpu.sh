#!/usr/bin/env bash
# The GPU set of docs/benchmarks.md, for a lent GPU (not run yet: no GPU was lent so far).
# A Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads / 8 KV heads, MLP 14336) with random
# bf16 weights made on the device (load_format=dummy; transformers' baseline builds the same shape
# from the config); its vocabulary is the bundled tokenizer's 4096, so the LM head is smaller than
# Llama-3's. 256 requests of 1k in / 1k out; the sequential baseline runs 4 of them (a rate).
set -euo pipefail
out=${OUT:-benchmarks/results}
shape=${SHAPE_DIR:-/tmp/llama3-8b-shape}
tag=gpu-llama3-8b-shape-$(date -u +%Y%m%d)
python - "$shape" <<'PY'
import shutil, sys
from pathlib import Path
from transformers import LlamaConfig
from pagedserve.assets import bundled_model_path
folder = Path(sys.argv[1])
LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, vocab_size=4096,
            bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype="bfloat16",
            architectures=["LlamaForCausalLM"]).save_pretrained(folder)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(bundled_model_path("pagedserve/tiny-py") / name, folder / name)
PY
pagedserve --log-level WARNING bench throughput --model "$shape" --load-format dummy --dtype bfloat16 \
    --max-model-len 4096 --max-num-seqs 256 --num-prompts 256 --lengths fixed:1024,1024 \
    --baseline hf --sequential-prompts 4 --output-json "$out/throughput-$tag.json"
python benchmarks/attention.py --out "$out/attention-$tag.json"
python benchmarks/moe_kernel.py --out "$out/moe-kernel-$tag.json"
