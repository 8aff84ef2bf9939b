#!/usr/bin/env bash
# The whole test suite: what README.md's test command and .ci/run both call.
# Installs what the tests need, then runs every unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."

# One warm build folder outside the clone, shared by every run on this machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ttrl-serve/target}"

# Python clients the server tests drive (the official openai SDK), in a venv outside the clone.
VENV="${TTRL_TEST_VENV:-$HOME/.cache/ttrl-serve/test-venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check openai==3.57.0 >/dev/null
export TTRL_TEST_PYTHON="$VENV/bin/python"

cargo build --release --bins
cargo test --release -- --test-threads=2
