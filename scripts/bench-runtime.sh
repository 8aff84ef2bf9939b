#!/usr/bin/env bash
# The model-runtime benchmark: `ttrl-serve bench` (decode at batch 1/8/32, prefill, forward+backward
# with LoRA, peak memory), then HF transformers (+ PEFT for the forward+backward) on the same GGUF in
# a bench-only venv, alternating.
# Usage: bash scripts/bench-runtime.sh   (BENCH_VENV=... reuses a venv that has torch + transformers + gguf + peft)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ttrl-serve/target}"
VENV="${BENCH_VENV:-$HOME/.cache/ttrl-serve/bench-venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch transformers gguf accelerate peft
fi
cargo build --release --bins
BIN="$CARGO_TARGET_DIR/release/ttrl-serve"
GGUF="${TTRL_SERVE_CACHE:-$HOME/.cache/ttrl-serve}/SmolLM2-135M-Instruct.Q4_1.gguf"
for round in 1 2; do
    echo "## round $round"
    "$BIN" bench --batch 1,8,32 --new-tokens 64 2>/dev/null
    "$VENV/bin/python" scripts/bench_transformers.py "$GGUF" --batch 1,8,32 --new-tokens 64 --threads 2 --train 16x128 2>/dev/null
done
