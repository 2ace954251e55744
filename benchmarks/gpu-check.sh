#!/usr/bin/env bash
# The GPU check: everything a lent GPU (one H100/H200, no network, its own python3 with torch,
# triton and transformers) should run, unattended, in under 8 minutes; docs/benchmarks.md says
# what each figure means.
#
#   benchmarks/gpu-check.sh             # on the GPU machine, from the repository root
#   benchmarks/gpu-check.sh --dry-run   # the same steps on the CPU with tiny shapes (CI runs it)
#
# Writes to $OUT (or benchmarks/results/gpu-check-DATE-COMMIT/): gpu-check.log (everything
# printed), gpu-check.json (device, date, commit, versions, each step's status and seconds, and
# the figures of every step that wrote JSON) and one JSON per benchmark. Each step has a time
# limit (on a GPU 420 s together, so the whole check ends within 8 minutes), and a failed step
# does not stop the others; the exit status is 1 if any step failed.
# PYTHON picks the interpreter (default python3); COMMIT names the commit where .git is absent.
# The dry run's kernels run under Triton's interpreter, its CUDA tests are only collected, and
# its limits are six times the GPU's (a loaded CI machine).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--dry-run]" >&2; exit 2
fi
py=${PYTHON:-python3}
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # COMMIT= where .git did not travel
stamp=$(date -u +%Y%m%d-%H%M)
out=${OUT:-benchmarks/results/gpu-check-$stamp-$commit}
mkdir -p "$out"
steps="$out/steps.tsv"
: > "$steps"
exec > >(tee "$out/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ $dry == 1 ]]; then export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1; fi

# pagedserve's plugins are entry points: without an installed distribution none would load.
if ! "$py" -c "import importlib.metadata as m; m.distribution('pagedserve')" 2>/dev/null; then
    echo "== installing pagedserve (editable, no dependencies, offline)"
    "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi

# step NAME LIMIT_SECONDS COMMAND...: run it, record status and seconds.
step() {
    local name=$1 limit=$(($2 * (dry ? 6 : 1))); shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS status=ok
    timeout --kill-after=10 "$limit" "$@" || { [[ $? == 124 ]] && status=timeout || status=failed; }
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$steps"
    echo "== $name: $status in $((SECONDS - start)) s"
}

# The 8B shape (Llama-3-8B's sizes, random bf16 weights) on a GPU; two tiny layers on the CPU.
shape=$(mktemp -d)
"$py" - "$shape" "$dry" <<'PY'
import shutil, sys
from pathlib import Path
from transformers import LlamaConfig
from pagedserve.assets import bundled_model_path
folder, dry = Path(sys.argv[1]), sys.argv[2] == "1"
sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2) if dry else dict(hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
LlamaConfig(**sizes, max_position_embeddings=8192, rope_theta=500000.0, vocab_size=4096, bos_token_id=0,
            eos_token_id=1, pad_token_id=2, dtype="float32" if dry else "bfloat16",
            architectures=["LlamaForCausalLM"]).save_pretrained(folder)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(bundled_model_path("pagedserve/tiny-py") / name, folder / name)
PY

cuda_tests="tests/test_cuda.py tests/test_triton_kernels.py tests/test_quant_triton.py tests/test_triton_backend.py"
if [[ $dry == 1 ]]; then
    dtype=float32
    # Only the GPU-only file is collected: CI runs the other three (interpreted or skipped).
    step cuda-tests 30 "$py" -m pytest -m cuda --collect-only -q -p no:cacheprovider tests/test_cuda.py
    step attention 30 env TRITON_INTERPRET=1 "$py" benchmarks/attention.py --dry-run --out "$out/attention.json"
    step quantization 30 "$py" benchmarks/quantization.py --decode --skip-quality --dry-run --steps 2 \
        --decode-context 32 --out "$out/quantization.json"
    step moe-kernel 30 "$py" benchmarks/moe_kernel.py --tiny --out "$out/moe-kernel.json"
    sizes=(--max-model-len 256 --max-num-seqs 4 --num-prompts 4 --lengths fixed:32,8 --sequential-prompts 1)
    latency=(--input-len 16 --output-len 8 --num-iters 1 --num-iters-warmup 0)
else
    dtype=bfloat16
    "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: use --dry-run'" || exit 1
    nvidia-smi || true
    step cuda-tests 140 "$py" -m pytest -m cuda -q -p no:cacheprovider -x --durations=10 $cuda_tests
    step attention 55 "$py" benchmarks/attention.py --quick --dtype bfloat16 --out "$out/attention.json"
    step quantization 60 "$py" benchmarks/quantization.py --decode --skip-quality --steps 10 \
        --out "$out/quantization.json"
    step moe-kernel 25 "$py" benchmarks/moe_kernel.py --out "$out/moe-kernel.json"
    sizes=(--max-model-len 2048 --max-num-seqs 128 --num-prompts 128 --lengths fixed:512,256 --sequential-prompts 2)
    latency=(--input-len 512 --output-len 128 --num-iters 3 --num-iters-warmup 1)
fi
step throughput-8b 100 "$py" -m pagedserve --log-level INFO bench throughput --model "$shape" --load-format dummy \
    --dtype $dtype "${sizes[@]}" --baseline hf --output-json "$out/throughput.json"
step latency-batch-1 40 "$py" -m pagedserve --log-level WARNING bench latency --model "$shape" --load-format dummy \
    --dtype $dtype --batch-size 1 "${latency[@]}" --output-json "$out/latency.json"
rm -rf "$shape"

"$py" - "$out" "$commit" "$dry" <<'PY'
import datetime, json, platform, sys
from pathlib import Path
import torch, transformers
out, commit, dry = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    steps[name] = {"status": status, "seconds": int(seconds)}
figures = {}
for path in sorted(out.glob("*.json")):
    if path.name != "gpu-check.json":
        figures[path.stem] = json.loads(path.read_text())
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
report = {
    "dry_run": dry, "device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit, "python": platform.python_version(), "torch": torch.__version__,
    "triton": triton_version, "transformers": transformers.__version__, "steps": steps, "figures": figures,
}
(out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
(out / "steps.tsv").unlink()
failed = [name for name, s in steps.items() if s["status"] != "ok"]
print(f"{device}: {len(steps) - len(failed)}/{len(steps)} steps ok" + (f", failed: {', '.join(failed)}" if failed else ""))
print(f"wrote {out / 'gpu-check.json'}")
sys.exit(1 if failed else 0)
PY
