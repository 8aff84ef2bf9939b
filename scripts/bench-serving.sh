#!/usr/bin/env bash
# The serving benchmark: the same bounded load (scripts/bench_serving.py) against ttrl-serve and
# against llama.cpp's OpenAI-compatible server (llama-cpp-python[server], built from PyPI into a
# bench-only venv) on the same SmolLM2 GGUF, twice, alternating. Loopback only; stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ttrl-serve/target}"
VENV="${LLAMA_VENV:-$HOME/.cache/ttrl-serve/llama-venv}"
GGUF="${TTRL_SERVE_CACHE:-$HOME/.cache/ttrl-serve}/SmolLM2-135M-Instruct.Q4_1.gguf"
CONC="${CONCURRENCY:-1,4,16}"
cargo build --release --bins
BIN="$CARGO_TARGET_DIR/release/ttrl-serve"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet 'llama-cpp-python[server]'
fi
wait_ready() { for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done; return 1; }
for round in 1 2; do
    "$BIN" serve --port 8101 2>/dev/null & pid=$!
    wait_ready http://127.0.0.1:8101/ready
    python3 scripts/bench_serving.py http://127.0.0.1:8101 --model SmolLM2-135M-Instruct --concurrency "$CONC" --label "ttrl-serve r$round"
    kill $pid; wait $pid || true
    "$VENV/bin/python" -m llama_cpp.server --model "$GGUF" --port 8102 --n_threads 2 --n_ctx 2048 >/dev/null 2>&1 & pid=$!
    wait_ready http://127.0.0.1:8102/v1/models
    python3 scripts/bench_serving.py http://127.0.0.1:8102 --concurrency "$CONC" --label "llama-cpp-python r$round"
    kill $pid; wait $pid || true
done
