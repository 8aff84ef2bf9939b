#!/usr/bin/env bash
# Serving beside learning: plain-request latency with and without an adaptation batch running
# (scripts/bench_beside_learning.py) on the default model, loopback only; stops by itself.
# BIN picks another build (an older commit's binary, to compare); extra args go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ttrl-serve/target}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --bins
    BIN="$CARGO_TARGET_DIR/release/ttrl-serve"
fi
DATA="$(mktemp -d)"
trap 'rm -rf "$DATA"' EXIT
"$BIN" serve --port 8103 --data-dir "$DATA" "$@" 2>/dev/null & pid=$!
for _ in $(seq 600); do curl -sf http://127.0.0.1:8103/ready >/dev/null && break; sleep 0.5; done
python3 scripts/bench_beside_learning.py http://127.0.0.1:8103 --label "${LABEL:-ttrl-serve}" || true
kill $pid; wait $pid || true
