#!/usr/bin/env python3
"""A bounded load on loopback against any OpenAI-compatible server (stdlib only): request
throughput, output tok/s, TTFT, TPOT and E2E (mean, median, p99) at fixed concurrency levels,
fixed prompt and output lengths, streaming /v1/completions. Tokens are counted as SSE chunks
with text (one token per chunk on ttrl-serve and llama.cpp's servers).

    python3 bench_serving.py http://127.0.0.1:8000 --model NAME --concurrency 1,4,16
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request

PROMPT = ("Write a long story about a lighthouse keeper who finds a map in a bottle. Describe the sea, the "
          "weather, the keeper's daily routine, the map's strange symbols, and the journey that follows, in detail.")


def one(base, model, max_tokens):
    # ignore_eos for servers that know it (vLLM, ttrl-serve, llama-server); a banned EOS (SmolLM2's
    # id 2) for those that do not: every request then produces exactly max_tokens.
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.7, "stream": True,
            "ignore_eos": True, "logit_bias": {"2": -100}}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    start = time.time()
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=1800) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices", [])):
                tokens += 1
                if first is None:
                    first = time.time()
    end = time.time()
    ttft = (first or end) - start
    return {"ttft": ttft, "e2e": end - start, "tokens": tokens,
            "tpot": (end - (first or end)) / max(1, tokens - 1)}


def stats(xs):
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return f"{statistics.mean(xs):.3f} / {statistics.median(xs):.3f} / {p99:.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--model", default="")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--label", default="server")
    args = ap.parse_args()
    one(args.base, args.model, 4)  # warm-up
    print(f"| {args.label} | concurrency | req/s | out tok/s | TTFT s (mean/median/p99) | TPOT s | E2E s |")
    print("|---|---|---|---|---|---|---|")
    for c in [int(x) for x in args.concurrency.split(",")]:
        results, lock = [], threading.Lock()

        def client():
            for _ in range(args.requests_per_client):
                r = one(args.base, args.model, args.max_tokens)
                with lock:
                    results.append(r)
        start = time.time()
        threads = [threading.Thread(target=client) for _ in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - start
        toks = sum(r["tokens"] for r in results)
        print(f"| {args.label} | {c} | {len(results) / wall:.2f} | {toks / wall:.1f} | {stats([r['ttft'] for r in results])} |"
              f" {stats([r['tpot'] for r in results])} | {stats([r['e2e'] for r in results])} |", flush=True)


if __name__ == "__main__":
    main()
