#!/usr/bin/env bash
# The serving benchmark: the same bounded load (scripts/bench_serving.py) against ttrl-serve and
# against llama.cpp's own `llama-server` on the same SmolLM2 GGUF, twice, alternating. Loopback only;
# stops by itself.
#
# llama-server is built once, by CMake, from the copy of llama.cpp vendored in the llama-cpp-python
# source distribution on PyPI (the package registry is the only network this project assumes), into
# ~/.cache/ttrl-serve/llama.cpp; LLAMA_SERVER=/path/to/llama-server uses another build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ttrl-serve/target}"
CACHE="${TTRL_SERVE_CACHE:-$HOME/.cache/ttrl-serve}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
CONC="${CONCURRENCY:-1,4,16}"
LLAMA_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cargo build --release --bins
BIN="$CARGO_TARGET_DIR/release/ttrl-serve"

LLAMA_SERVER="${LLAMA_SERVER:-$CACHE/llama.cpp/build/bin/llama-server}"
if [ ! -x "$LLAMA_SERVER" ]; then
    src="$CACHE/llama.cpp"
    mkdir -p "$src"
    url=$(python3 - "$LLAMA_VERSION" <<'EOF'
import json, sys, urllib.parse, urllib.request
api = "https://pypi.org/pypi/llama-cpp-python/json"
files = json.load(urllib.request.urlopen(api))["releases"][sys.argv[1]]
print(urllib.parse.urljoin(api, next(f["url"] for f in files if f["packagetype"] == "sdist")))
EOF
)
    curl -sfL "$url" | tar xz -C "$src" --strip-components=3 "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
    python3 -m venv "$CACHE/cmake-venv"
    "$CACHE/cmake-venv/bin/pip" install --quiet cmake
    cmake="$CACHE/cmake-venv/bin/cmake"
    "$cmake" -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
    "$cmake" --build "$src/build" --target llama-server -j"$(nproc)" >/dev/null
fi

wait_ready() { for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done; return 1; }
for round in 1 2; do
    "$BIN" serve --port 8101 2>/dev/null & pid=$!
    wait_ready http://127.0.0.1:8101/ready
    python3 scripts/bench_serving.py http://127.0.0.1:8101 --model SmolLM2-135M-Instruct --concurrency "$CONC" --label "ttrl-serve r$round"
    kill $pid; wait $pid || true
    # 16 slots of 1024 tokens each (the prompt and 128 new tokens fit), continuous batching.
    "$LLAMA_SERVER" --model "$GGUF" --port 8102 --threads 2 --parallel 16 --ctx-size 16384 >/dev/null 2>&1 & pid=$!
    wait_ready http://127.0.0.1:8102/health
    python3 scripts/bench_serving.py http://127.0.0.1:8102 --concurrency "$CONC" --label "llama-server r$round"
    kill $pid; wait $pid || true
done
