#!/usr/bin/env bash
# The "Output kinds at 2k-token contexts" table of docs/benchmarks.md: a one-layer Llama of hidden
# size 64 with random weights (so the forward is small and the engine's own per-step cost shows)
# and the bundled tokenizer, 32 requests of 2000 prompt tokens and 96 output tokens, run with each
# output_kind in one process. Run from the repository root with the virtualenv active, on an
# otherwise idle machine.
set -euo pipefail
out=${OUT:-benchmarks/results}
model=$(mktemp -d)
trap 'rm -rf "$model"' EXIT
cp pagedserve/assets/tiny-py/tokenizer.json pagedserve/assets/tiny-py/tokenizer_config.json "$model"/
python - "$model" <<'PY'
import json, sys
config = json.load(open("pagedserve/assets/tiny-py/config.json"))
config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=2100, dtype="float32")
json.dump(config, open(f"{sys.argv[1]}/config.json", "w"), indent=2)
PY
pagedserve --log-level WARNING bench throughput --model "$model" --load-format dummy \
    --lengths fixed:2000,96 --num-prompts 32 --max-model-len 2100 --max-num-batched-tokens 8192 \
    --compare-output-kinds --output-json "$out/throughput-cpu-output-kinds-2k.json"
