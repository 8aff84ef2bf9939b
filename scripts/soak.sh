#!/usr/bin/env bash
# The soak: 32 clients from 4 tenants for 10 minutes against the default model on loopback
# (scripts/soak.py), with light adaptation settings so episodes keep coming, and caps low
# enough to be reached. Not part of the test suite; stops by itself.
# Usage: bash scripts/soak.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ttrl-serve/target}"
cargo build --release --bins
BIN="$CARGO_TARGET_DIR/release/ttrl-serve"
DIR="$(mktemp -d)"
trap 'rm -rf "$DIR"' EXIT
KEYS=""
for t in 0 1 2 3; do
    key="soak-tenant-$t-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    printf '[[key]]\nkey = "%s"\ntenant = "tenant%s"\nrights = ["infer", "adapt", "train"]\n\n' "$key" "$t" >>"$DIR/keys.toml"
    KEYS="$KEYS${KEYS:+,}$key"
done
cat >"$DIR/settings.toml" <<'TOML'
[engine]
max_adapters_per_tenant = 2
max_resident_adapters = 4
[adaptation]
samples = 8
train_samples = 4
max_tokens = 48
TOML
"$BIN" serve --port 8104 --config "$DIR/settings.toml" --api-keys-file "$DIR/keys.toml" \
    --data-dir "$DIR/adapters" 2>"$DIR/server.log" & pid=$!
for _ in $(seq 600); do curl -sf http://127.0.0.1:8104/ready >/dev/null && break; sleep 0.5; done
python3 scripts/soak.py http://127.0.0.1:8104 --pid $pid --keys "$KEYS" \
    --model SmolLM2-135M-Instruct --seconds "${1:-600}" || true
grep -c " ERROR " "$DIR/server.log" | sed 's/^/server log ERROR lines: /' || true
kill $pid; wait $pid || true
