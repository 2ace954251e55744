#!/usr/bin/env bash
# Speculative decoding on the CPU with the bundled model: batch 1 speed-ups (bench latency's
# defaults: 128 output tokens x 30 iterations, each a held-out prompt, after 1 warm-up), RUNS runs each
# (ngram on the code-editing workload at k = 4 and 8, draft_model on held-out stdlib prompts),
# then batches 2, 4, 16 and 64 with speculation forced on (disable_by_batch_size 0), to find the
# cross-over (BATCHES=0: batch 1 only). Each run measures plain decoding in the same process: read the ratios, not the
# bare times. Run it under the shared benchmark lock on a quiet machine and note `uptime`:
#     flock /work/wt/bench.lock benchmarks/speculative.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-run}
RUNS=${RUNS:-3}
ngram() { echo "{\"method\": \"ngram\", \"num_speculative_tokens\": $1, \"prompt_lookup_max\": 4, \"disable_by_batch_size\": 0}"; }
DRAFT='{"method": "draft_model", "num_speculative_tokens": 4, "disable_by_batch_size": 0}'
latency() { $PY -m pagedserve bench latency "$@" | grep -E "speed-up|accepted"; }
for run in $(seq "$RUNS"); do
    uptime
    latency --workload stdlib --speculative-config "$DRAFT" \
        --output-json "$OUT/latency-cpu-tiny-py-draft-stdlib-$TAG$run.json"
    latency --workload stdlib-edit --speculative-config "$(ngram 4)" \
        --output-json "$OUT/latency-cpu-tiny-py-ngram-edit-$TAG$run.json"
    latency --workload stdlib-edit --speculative-config "$(ngram 8)" \
        --output-json "$OUT/latency-cpu-tiny-py-ngram-k8-edit-$TAG$run.json"
done
uptime
[ "${BATCHES:-1}" = 1 ] || exit 0
batches() { $PY -m pagedserve bench latency --batch-size 2,4,16,64 --output-len 32 --num-iters 1 \
    --num-iters-warmup 1 "$@" | grep -E "speed-up|accepted"; }
batches --workload stdlib --speculative-config "$DRAFT" --output-json "$OUT/latency-cpu-tiny-py-draft-stdlib-batches-$TAG.json"
batches --workload stdlib-edit --speculative-config "$(ngram 4)" \
    --output-json "$OUT/latency-cpu-tiny-py-ngram-edit-batches-$TAG.json"
uptime
