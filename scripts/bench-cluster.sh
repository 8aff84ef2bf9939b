#!/usr/bin/env bash
# The scale-out benchmark on this machine: short chat requests (plain, and spread over named
# adapters) against one replica alone and through HAProxy in front of three
# (scripts/cluster.sh), then the seconds from killing the replica serving an adapter to that
# adapter being served again. Loopback only; stops by itself.
#   SECONDS_PER_RUN=60 CLIENTS=8 bash scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${TTRL_CLUSTER_DIR:-${TTRL_SERVE_CACHE:-$HOME/.cache/ttrl-serve}/cluster}"
PROXY_PORT="${TTRL_PROXY_PORT:-8100}"
KEY="bench-admin-key"
SECS="${SECONDS_PER_RUN:-60}"
CLIENTS="${CLIENTS:-8}"
trap 'bash scripts/cluster.sh down >/dev/null' EXIT
bash scripts/cluster.sh up --admin-api-key "$KEY" "$@"
python3 scripts/bench_cluster.py "http://127.0.0.1:$((PROXY_PORT + 1))" --clients "$CLIENTS" --seconds "$SECS" \
    --admin-key "$KEY" --label "one replica"
python3 scripts/bench_cluster.py "http://127.0.0.1:$PROXY_PORT" --clients "$CLIENTS" --seconds "$SECS" \
    --admin-key "$KEY" --label "proxy + 3 replicas"
python3 scripts/bench_cluster.py "http://127.0.0.1:$PROXY_PORT" --failover --pid-dir "$RUN" \
    --admin-key "$KEY" --label "proxy + 3 replicas"
