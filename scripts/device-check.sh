#!/usr/bin/env bash
# The GPU checks, in two halves because the GPU machine has no Rust toolchain and no
# registry access:
#
#   scripts/device-check.sh pack   # here: build with --features cuda, pack into .device/
#   scripts/device-check.sh run    # there: parity + gradient tests on CUDA, then speed
#
# `DEVICE=cpu scripts/device-check.sh run` rehearses the second half on a CPU build packed
# with `FEATURES= scripts/device-check.sh pack` (small sizes: SMALL=1).
# `run` needs only the packed binaries, tests/fixtures and configs/shapes (a few MiB in all)
# and a CUDA 13 runtime (libcudart, cublas, cublasLt, curand, nvrtc) with a r580+ driver.
# Speed is measured on random weights of each shape (SmolLM2-135M, Qwen2.5-1.5B): values do
# not change speed, and the real SmolLM2 GGUF (98 MB) is over what one call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
pack_dir=.device

device=${DEVICE:-cuda:0}
features=${FEATURES-cuda}

pack() {
    if [ -n "$features" ]; then
        eval "$(scripts/cuda-toolchain.sh)"
        export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$HOME/.cache/ttrl-serve/target-cuda}
    fi
    local started=$SECONDS
    cargo build --release --features "$features"
    local tests
    tests=$(cargo test --release --features "$features" --test integration --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "integration" and m.get("executable"):
        print(m["executable"])' | tail -1)
    echo "built in $((SECONDS - started)) s" >&2
    mkdir -p "$pack_dir"
    for bin in "$CARGO_TARGET_DIR/release/ttrl-serve" "$tests"; do
        strip -o "$pack_dir/$(basename "$bin" | sed 's/-[0-9a-f]*$//')" "$bin"
    done
    xz -T0 -6 -f "$pack_dir/ttrl-serve" "$pack_dir/integration"
    du -ch "$pack_dir"/* >&2
    echo "carry [\"$pack_dir\"] and run: bash scripts/device-check.sh run" >&2
}

# CUDA 13 libraries: the system's, else the ones pip installed beside PyTorch.
find_cuda_libs() {
    local dir
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -e "$dir/libcublasLt.so.13" ] && echo "$dir" && return
    done
    python3 - <<'EOF' 2>/dev/null || true
import glob, os, site
for root in site.getsitepackages():
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "libcublasLt.so.13"), recursive=True):
        dirs = {os.path.dirname(p) for p in glob.glob(os.path.join(root, "nvidia", "**", "lib*.so.1*"), recursive=True)}
        print(":".join(sorted(dirs)))
        raise SystemExit
EOF
}

bench_rows() {
    local label=$1
    shift
    "$bin/ttrl-serve" bench --device "$device" "$@" | tee -a "$log" |
        awk -v m="$label" -F'|' '/^\| (prefill|decode|forward|adaptation|peak)/ {
            gsub(/^ +| +$/, "", $2); gsub(/^ +| +$/, "", $3); printf "| %s | %s | %s |\n", m, $2, $3 }'
}

run() {
    bin=$(mktemp -d)
    log=${OUT:-/tmp}/device-check.log
    : >"$log"
    for f in "$pack_dir"/*.xz; do xz -dc "$f" >"$bin/$(basename "$f" .xz)"; done
    chmod +x "$bin"/*
    local libs
    libs=$(find_cuda_libs)
    export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
    fi

    echo "== parity and gradient tests on $device ==" | tee -a "$log"
    local status=0
    TTRL_TEST_DEVICE=$device TTRL_FIXTURES_DIR=$PWD/tests/fixtures \
        "$bin/integration" --test-threads 1 parity:: gradients:: >>"$log" 2>&1 || status=1
    grep -E '^test |^test result' "$log"

    echo "== speed ==" | tee -a "$log"
    local sizes=(--batch 1,8,32,64 --new-tokens 128 --episode-questions 8 --episode-samples 16 --episode-max-tokens 128)
    if [ -n "${SMALL:-}" ]; then
        sizes=(--batch 1,2 --new-tokens 4 --prefill-tokens 16 --train-sequences 1 --train-tokens 8
            --episode-questions 1 --episode-samples 2 --episode-max-tokens 4)
    fi
    local rows
    rows=$(
        bench_rows "SmolLM2-135M (random weights)" --model random:configs/shapes/smollm2-135m/config.json "${sizes[@]}"
        bench_rows "Qwen2.5-1.5B (random weights)" --model random:configs/shapes/qwen2.5-1.5b/config.json "${sizes[@]}"
    )
    echo "| model | measurement | value |"
    echo "|---|---|---|"
    echo "$rows"
    return $status
}

case "${1:-run}" in
pack) pack ;;
run) run ;;
*)
    echo "usage: $0 pack|run" >&2
    exit 2
    ;;
esac
