#!/usr/bin/env bash
# Speculative decoding on the CPU with the bundled model: batch 1 speed-ups (ngram on the
# code-editing workload, draft_model on held-out stdlib prompts) and batches 16 and 64 with
# speculation forced on (disable_by_batch_size 0), to find the cross-over. Each run measures
# plain decoding in the same process; the ratios are what to read, not the bare times. The
# batch-1 runs go twice: with torch's default threads and with OMP_NUM_THREADS=1 (on a loaded
# machine a 2-thread op waits for a free core; see docs/speculative.md).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "disable_by_batch_size": 0}'
DRAFT='{"method": "draft_model", "num_speculative_tokens": 4, "disable_by_batch_size": 0}'
$PY -m pagedserve bench latency --workload stdlib-edit --output-len 64 --num-iters 3 \
    --speculative-config "$NGRAM" --output-json "$OUT/latency-cpu-tiny-py-ngram-edit.json"
$PY -m pagedserve bench latency --workload stdlib --output-len 64 --num-iters 3 \
    --speculative-config "$DRAFT" --output-json "$OUT/latency-cpu-tiny-py-draft-stdlib.json"
OMP_NUM_THREADS=1 $PY -m pagedserve bench latency --workload stdlib-edit --output-len 64 --num-iters 3 \
    --speculative-config "$NGRAM" --output-json "$OUT/latency-cpu-tiny-py-ngram-edit-1thread.json"
OMP_NUM_THREADS=1 $PY -m pagedserve bench latency --workload stdlib --output-len 64 --num-iters 3 \
    --speculative-config "$DRAFT" --output-json "$OUT/latency-cpu-tiny-py-draft-stdlib-1thread.json"
$PY -m pagedserve bench latency --workload stdlib-edit --batch-size 4,16,64 --output-len 32 --num-iters 1 \
    --num-iters-warmup 0 --speculative-config "$NGRAM" --output-json "$OUT/latency-cpu-tiny-py-ngram-edit-batches.json"
$PY -m pagedserve bench latency --workload stdlib --batch-size 4,16,64 --output-len 32 --num-iters 1 \
    --num-iters-warmup 0 --speculative-config "$DRAFT" --output-json "$OUT/latency-cpu-tiny-py-draft-stdlib-batches.json"
