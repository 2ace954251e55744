#!/usr/bin/env bash
# Reproduces the CPU tables of docs/benchmarks.md: the bundled model (pagedserve/tiny-py), 64
# requests with ShareGPT-shaped lengths, offline against transformers, then through the server.
# Run from the repository root with the virtualenv active (make setup; . .venv/bin/activate),
# on an otherwise idle machine: every figure is a ratio measured in the same run.
set -euo pipefail
out=${OUT:-benchmarks/results}
tag=cpu-tiny-py-$(date -u +%Y%m%d)
port=${PORT:-8123}
bench="pagedserve --log-level WARNING bench"

# The default configuration (float32, eager) against transformers in the same dtype.
$bench throughput --num-prompts 64 --lengths sharegpt --baseline hf --output-json "$out/throughput-$tag.json"
# The fastest configuration on this CPU (bfloat16 on AMX, compiled), both systems warmed up, against
# transformers in its own fastest dtype here (float32: its one-at-a-time bf16 matmuls are slower).
$bench throughput --num-prompts 64 --lengths sharegpt --dtype bfloat16 --torch-compile --warmup-prompts 64 \
    --baseline hf --baseline-dtype float32 --output-json "$out/throughput-$tag-bf16-compiled.json"
$bench throughput --num-prompts 64 --lengths sharegpt --block-size 8 --output-json "$out/throughput-$tag-block8.json"

# The server under a streaming load from the same machine. First as is (its two torch threads share
# the two cores with the load generator), then with one torch thread on each side, server and the
# offline comparison alike, leaving a core to the load generator: the server's own cost.
serve_bench() {  # $1: result file suffix
    pagedserve --log-level WARNING serve --port "$port" &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        sleep 1
    done
    $bench serve --base-url "http://127.0.0.1:$port/v1" --num-prompts 64 --lengths sharegpt --vocab-size 4096 \
        --max-model-len 512 --compare-offline pagedserve/tiny-py --output-json "$out/serve-$tag$1.json"
    kill $server
    wait $server || true
}
serve_bench ""
OMP_NUM_THREADS=1 serve_bench "-1thread"
