#!/usr/bin/env bash
# `ttrl-serve` with its arguments, built first if needed into the one build folder the test
# suite uses too (~/.cache/ttrl-serve/target), so neither README command rebuilds the other's work.
# Usage: bash scripts/run.sh serve [--model ...]
set -euo pipefail
CACHE="${TTRL_SERVE_CACHE:-$HOME/.cache/ttrl-serve}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
exec cargo run --quiet --release --manifest-path "$(dirname "$0")/../Cargo.toml" -- "$@"
