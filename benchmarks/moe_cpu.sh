#!/usr/bin/env bash
# The MoE decode figure of docs/benchmarks.md on the CPU: a Mixtral-shaped model at the bundled
# model's scale (4 layers, hidden 384, 6 heads / 2 KV heads, 8 experts of 512, top-2; the bundled
# tokenizer's 4,096 tokens) with random float32 weights (load_format=dummy; transformers' baseline
# builds the same shape from the config), the dense tables' workload (64 requests, ShareGPT-shaped
# lengths), against transformers' generate in the same run.
set -euo pipefail
out=${OUT:-benchmarks/results}
shape=${SHAPE_DIR:-/tmp/mixtral-tiny-shape}
tag=cpu-mixtral-tiny-shape-$(date -u +%Y%m%d)
python - "$shape" <<'PY'
import shutil, sys
from pathlib import Path
from transformers import MixtralConfig
from pagedserve.assets import bundled_model_path
folder = Path(sys.argv[1])
MixtralConfig(hidden_size=384, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
              max_position_embeddings=512, vocab_size=4096, tie_word_embeddings=True,
              bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype="float32",
              architectures=["MixtralForCausalLM"]).save_pretrained(folder)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(bundled_model_path("pagedserve/tiny-py") / name, folder / name)
PY
pagedserve --log-level WARNING bench throughput --model "$shape" --load-format dummy --num-prompts ${NUM_PROMPTS:-64} \
    --lengths sharegpt --baseline hf --sequential-prompts ${SEQUENTIAL_PROMPTS:-16} --output-json "$out/throughput-$tag${TAG_SUFFIX:-}.json" "$@"
