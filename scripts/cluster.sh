#!/usr/bin/env bash
# One machine to many, on loopback: an S3-compatible server (moto, scripts/s3_server.py),
# three ttrl-serve replicas whose named adapters live in its bucket, and HAProxy in front
# routing by the `x-ttrl-adapter` header (deploy/haproxy.cfg).
#
#   bash scripts/cluster.sh up [serve flags...]   # e.g. --config configs/smollm2-cpu.toml
#   bash scripts/cluster.sh down
#
# Clients talk to the proxy (http://127.0.0.1:8100 unless TTRL_PROXY_PORT says otherwise) and
# send `x-ttrl-adapter: <name>` with requests for a named adapter. Logs and process ids are
# kept in ~/.cache/ttrl-serve/cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${TTRL_SERVE_CACHE:-$HOME/.cache/ttrl-serve}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
RUN="${TTRL_CLUSTER_DIR:-$CACHE/cluster}"
PROXY_PORT="${TTRL_PROXY_PORT:-8100}"
S3_PORT="${TTRL_S3_PORT:-9000}"
REPLICAS=3

stop_all() {
    for pidfile in "$RUN"/*.pid; do
        [ -e "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

wait_for() { # url, what
    for _ in $(seq 1 600); do
        if curl -fs -o /dev/null "$1"; then return 0; fi
        sleep 0.2
    done
    echo "$2 did not come up; see $RUN" >&2
    exit 1
}

up() {
    mkdir -p "$RUN"
    stop_all
    if ! command -v haproxy >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
    fi
    VENV="$CACHE/cluster-venv"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==5.2.5" >/dev/null
    cargo build --quiet --release --bins

    "$VENV/bin/python" scripts/s3_server.py "$S3_PORT" ttrl >"$RUN/s3.log" 2>&1 &
    echo $! >"$RUN/s3.pid"
    wait_for "http://127.0.0.1:$S3_PORT/ttrl" "the S3 server"

    # The usual AWS variables point object_store at the local server.
    export AWS_ENDPOINT="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
        AWS_ACCESS_KEY_ID=cluster AWS_SECRET_ACCESS_KEY=cluster
    for i in $(seq 1 "$REPLICAS"); do
        port=$((PROXY_PORT + i))
        "$CARGO_TARGET_DIR/release/ttrl-serve" serve --port "$port" \
            --adapter-store s3://ttrl/adapters --data-dir "$RUN/replica-$i" "$@" \
            >"$RUN/replica-$i.log" 2>&1 &
        echo $! >"$RUN/replica-$i.pid"
        export "TTRL_REPLICA_$i=127.0.0.1:$port"
    done
    for i in $(seq 1 "$REPLICAS"); do
        wait_for "http://127.0.0.1:$((PROXY_PORT + i))/ready" "replica $i"
    done
    TTRL_PROXY_BIND="127.0.0.1:$PROXY_PORT" haproxy -f deploy/haproxy.cfg -D -p "$RUN/haproxy.pid"
    wait_for "http://127.0.0.1:$PROXY_PORT/ready" "the proxy"
    echo "cluster up: proxy http://127.0.0.1:$PROXY_PORT, replicas on ports $((PROXY_PORT + 1))-$((PROXY_PORT + REPLICAS)), S3 on $S3_PORT"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) stop_all; echo "cluster down" ;;
    *) echo "usage: $0 up [serve flags...] | down" >&2; exit 2 ;;
esac
