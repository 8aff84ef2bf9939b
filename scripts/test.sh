#!/usr/bin/env bash
# The whole test suite: what README.md's test command and .ci/run both call.
# Installs what the tests need, then runs every unit and integration test and the
# browser test of the playground.
set -euo pipefail
# A step that fails says which, instead of ending the run without a word.
trap 'echo "scripts/test.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
CACHE="${TTRL_SERVE_CACHE:-$HOME/.cache/ttrl-serve}"

# One warm build folder outside the clone, shared by every run on this machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"

# Python tools the tests drive, in a venv outside the clone: the official openai SDK,
# transformers + peft (exported adapters must load there), schemathesis (API fuzzing) and
# moto (an S3-compatible server for the scale-out tests).
VENV="$CACHE/test-venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    openai==3.57.0 torch==2.15.0 transformers==5.24.0 peft==0.21.2 schemathesis==4.32.5 \
    "moto[server]==5.2.5" >/dev/null
export TTRL_TEST_PYTHON="$VENV/bin/python"

# Debian's chromium and playwright-core from npm, for the browser test; Debian's HAProxy
# for the scale-out tests.
if ! command -v chromium >/dev/null 2>&1 || ! command -v haproxy >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core haproxy >/dev/null
fi
BROWSER_DEPS="$CACHE/browser"
if [ ! -d "$BROWSER_DEPS/node_modules/playwright-core" ]; then
    mkdir -p "$BROWSER_DEPS"
    (cd "$BROWSER_DEPS" && npm install --silent --no-audit --no-fund playwright-core@1.65 >/dev/null)
fi

# Tests never touch the user's adapters: the data folder must be the same afterwards.
USER_DATA="${XDG_DATA_HOME:-$HOME/.local/share}/ttrl-serve"
# (A folder that does not exist yet is a snapshot too: find's failure must not end the run.)
snapshot() { { find "$USER_DATA" -printf '%P %s %T@\n' 2>/dev/null || true; } | sort | sha256sum; }
BEFORE="$(snapshot)"
# Nor the work tree: whatever a test writes goes to temporary folders, all of them in one
# folder for this run that goes when the run ends (each run left about 120 MB in /tmp before).
TREE_BEFORE="$(git status --porcelain 2>/dev/null || true)"
TMPDIR="$(mktemp -d "${TMPDIR:-/tmp}/ttrl-tests.XXXXXX")"
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT

# No dependency the code does not use.
command -v cargo-machete >/dev/null 2>&1 || cargo install --quiet --locked cargo-machete
cargo machete

cargo build --release --bins
cargo test --release -- --test-threads=2

TTRL_BIN="$CARGO_TARGET_DIR/release/ttrl-serve" NODE_PATH="$BROWSER_DEPS/node_modules" \
    TTRL_ARTIFACTS="${TTRL_ARTIFACTS:-$CACHE/test-artifacts}" node tests/browser/playground.mjs

if [ "$(snapshot)" != "$BEFORE" ]; then
    echo "the tests changed the user's data folder $USER_DATA" >&2
    exit 1
fi
if [ "$(git status --porcelain 2>/dev/null || true)" != "$TREE_BEFORE" ]; then
    echo "the tests changed the work tree:" >&2
    git status --short >&2
    exit 1
fi
