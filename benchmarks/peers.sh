#!/usr/bin/env bash
# The peer benchmark of issue 22: pagedserve against llama.cpp (llama-server, built from the
# llama-cpp-python source with its GGUF converter), CTranslate2 and transformers, each in its own
# virtualenv, on the same two float32 checkpoints (the bundled tiny-py, a SmolLM-135M-shaped random
# model) and the same token-id workload, interleaved (benchmarks/peers/run.py says what is run).
# Writes benchmarks/results/peers-cpu.json (OUTPUT) and its docs table (.md next to it), and
# prints the table and how long it took. Not part of `make test`. Run from the repository root
# after `make setup`, on an otherwise idle machine: once built and converted (the first run
# builds llama.cpp, about an hour on two cores), the default run takes about a quarter of an hour.
#
#   benchmarks/peers.sh [fp32|int8|bf16 ...]        (default: fp32 int8 bf16)
# Environment: PEERS_DIR (default .peers: sources, builds, venvs, converted models), THREADS (2),
# ROUNDS (3; LARGE_ROUNDS 1 for the 135M shape), NUM_PROMPTS (64), LENGTHS (uniform:32-256,16-256),
# BATCH1_TOKENS (256),
# SEQUENTIAL_PROMPTS (8; LARGE_SEQUENTIAL_PROMPTS 4), SCENARIOS (offline-64,serve-64,batch-1;
# LARGE_SCENARIOS offline-64,batch-1), MODELS (tiny-py,smollm-135m-shape), SYSTEMS (all),
# OUTPUT (benchmarks/results/peers-cpu.json), LLAMA_CPP_PYTHON_VERSION (0.3.36), JOBS (build jobs, 2),
# O3_CONFIG (pagedserve-O3's compilation_config, JSON; default {"level": 3}).
set -euo pipefail
started=$SECONDS
peers=${PEERS_DIR:-.peers}
threads=${THREADS:-2}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
models=${MODELS:-tiny-py,smollm-135m-shape}
py=.venv/bin/python
precisions=("$@")
[ $# -eq 0 ] && precisions=(fp32 int8 bf16)
mkdir -p "$peers/src" "$peers/models" "$peers/gguf" "$peers/ct2" benchmarks/results

# The checkpoints every system reads.
$py benchmarks/peers/models.py "$peers/models"

# llama.cpp: the source llama-cpp-python vendors, from PyPI's sdist; llama-server built from it.
src="$peers/src/llama_cpp_python-$version"
if [ ! -d "$src" ]; then
    $py -m pip download --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$peers/src"
    tar xzf "$peers/src/llama_cpp_python-$version.tar.gz" -C "$peers/src"
fi
llama="$src/vendor/llama.cpp"
server="$peers/llama.cpp-build/bin/llama-server"
if [ ! -x "$server" ]; then
    cmake -S "$llama" -B "$peers/llama.cpp-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
    nice cmake --build "$peers/llama.cpp-build" -j "${JOBS:-2}" --target llama-server
fi

# Each peer's own virtualenv (CPU torch from the same version as ours, pinned).
venv() {  # $1: name, then packages
    local dir="$peers/venv-$1"; shift
    if [ ! -x "$dir/bin/python" ]; then
        python3 -m venv "$dir"
        "$dir/bin/python" -m pip install -q "$(grep '^torch==' .venv/constraints.txt)"
        "$dir/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$dir/constraints.txt"
    fi
    "$dir/bin/python" -m pip install -q -c "$dir/constraints.txt" "$@"
}
venv ct2 ctranslate2 transformers safetensors
venv hf transformers safetensors numpy pyyaml sentencepiece protobuf

IFS=, read -ra names <<< "$models"
for name in "${names[@]}"; do
    for outtype in f32 q8_0 bf16; do
        gguf="$peers/gguf/$name-$outtype.gguf"
        [ -f "$gguf" ] || "$peers/venv-hf/bin/python" benchmarks/peers/convert_gguf.py "$llama" \
            "$peers/models/$name" --outtype "$outtype" --outfile "$gguf"
    done
    # float32 on disk; int8 is CTranslate2's compute_type at load time.
    [ -f "$peers/ct2/$name/model.bin" ] || "$peers/venv-ct2/bin/python" -m ctranslate2.converters.transformers \
        --model "$peers/models/$name" --output_dir "$peers/ct2/$name" --force
done

echo "set-up took $((SECONDS - started)) s"
IFS=, ; precision_list="${precisions[*]}"; unset IFS
$py benchmarks/peers/run.py --models-dir "$peers/models" --models "$models" --precision "$precision_list" \
    --gguf-dir "$peers/gguf" --llama-server "$server" --llama-source "$src" --ct2-dir "$peers/ct2" \
    --ct2-python "$peers/venv-ct2/bin/python" --hf-python "$peers/venv-hf/bin/python" \
    ${O3_CONFIG:+--o3-config "$O3_CONFIG"} \
    --threads "$threads" --rounds "${ROUNDS:-3}" --large-rounds "${LARGE_ROUNDS:-1}" \
    --num-prompts "${NUM_PROMPTS:-64}" --lengths "${LENGTHS:-uniform:32-256,16-256}" --batch1-tokens "${BATCH1_TOKENS:-256}" \
    --sequential-prompts "${SEQUENTIAL_PROMPTS:-8}" --large-sequential-prompts "${LARGE_SEQUENTIAL_PROMPTS:-4}" \
    ${SCENARIOS:+--scenarios "$SCENARIOS"} ${LARGE_SCENARIOS:+--large-scenarios "$LARGE_SCENARIOS"} \
    ${SYSTEMS:+--systems "$SYSTEMS"} --output-json "${OUTPUT:-benchmarks/results/peers-cpu.json}"
echo "benchmarks/peers.sh took $((SECONDS - started)) s"
