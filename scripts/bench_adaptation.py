#!/usr/bin/env python3
"""Does test-time adaptation help SmolLM2-135M-Instruct on questions where its majority vote beats
single samples? Drives a real ttrl-serve over HTTP (stdlib only) and prints one Markdown table.

Questions: single-digit addition and multiplication in words ("What is 7 plus 5? Answer with just
the number."), the sets ../shared/ASSETS.md measured with maj@16 well above pass@1. Protocol
(transductive, as TTRL): adapt a named adapter on the unlabeled questions in batches, then answer
the same questions; gold answers only score.

    python3 scripts/bench_adaptation.py --binary $CARGO_TARGET_DIR/release/ttrl-serve
"""
import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

MODEL = "SmolLM2-135M-Instruct"


def questions(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        if i % 2 == 0:
            out.append((f"What is {a} plus {b}? Answer with just the number.", a + b))
        else:
            out.append((f"What is {a} times {b}? Answer with just the number.", a * b))
    return out


def answer(text):
    nums = re.findall(r"-?\d+", text.replace(",", ""))
    return int(nums[-1]) if nums else None


def post(base, body, timeout=3600):
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def evaluate(base, model, qs, k, temperature, max_tokens):
    """pass@1 (mean over k samples), maj@k, greedy accuracy and mean response length."""
    def one(item):
        i, (q, gold) = item
        msgs = [{"role": "user", "content": q}]
        s = post(base, {"model": model, "messages": msgs, "n": k, "temperature": temperature,
                        "max_tokens": max_tokens, "seed": 1000 + i})
        g = post(base, {"model": model, "messages": msgs, "temperature": 0, "max_tokens": max_tokens})
        answers = [answer(c["message"]["content"]) for c in s["choices"]]
        votes = Counter(a for a in answers if a is not None)
        maj = votes.most_common(1)[0][0] if votes else None
        return (sum(a == gold for a in answers) / k, maj == gold, answer(g["choices"][0]["message"]["content"]) == gold,
                s["usage"]["completion_tokens"] / k)
    with ThreadPoolExecutor(len(qs)) as pool:
        rows = list(pool.map(one, enumerate(qs)))
    n = len(rows)
    return {"pass@1": sum(r[0] for r in rows) / n, f"maj@{k}": sum(r[1] for r in rows) / n,
            "greedy": sum(r[2] for r in rows) / n, "length": sum(r[3] for r in rows) / n}


def adapt(base, adapter, method, rollout, qs, batch, samples, steps, passes, max_tokens):
    reports = []
    for _ in range(passes):
        for start in range(0, len(qs), batch):
            chunk = qs[start:start + batch]
            def one(q):
                body = {"model": MODEL, "messages": [{"role": "user", "content": q[0]}], "temperature": 0,
                        "max_tokens": max_tokens,
                        "adaptation": {"enabled": True, "adapter": adapter, "method": method, "rollout": rollout,
                                       "samples": samples, "steps": steps, "answer_format": "number"}}
                return post(base, body)["adaptation"]
            with ThreadPoolExecutor(len(chunk)) as pool:
                rs = list(pool.map(one, chunk))
            reports.append(rs)
            print(f"  {adapter}: episode of {rs[0]['batch_questions']} questions, {rs[0]['duration_ms'] / 1e3:.0f} s,"
                  f" version {rs[0]['adapter_version']}, applied {rs[0]['applied']}, note {rs[0]['note']}", flush=True)
    return reports


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--arms", default="spine:tree,spine:flat,ttrl:tree,ttrl:flat")
    ap.add_argument("--out", default="bench-adaptation.json")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="ttrl-bench-")
    config = os.path.join(work, "bench.toml")
    with open(config, "w") as f:
        f.write(f"[engine]\nmax_batch = 256\n\n[adaptation]\nbatch_window_ms = 3000\nmax_questions = {args.batch}\n"
                f"max_tokens = {args.max_tokens}\nlr = {args.lr}\ntemperature = 0.8\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([args.binary, "serve", "--port", str(port), "--config", config,
                               "--data-dir", os.path.join(work, "adapters")], stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/ready", timeout=2)
                break
            except Exception:
                time.sleep(0.5)
        qs = questions(args.questions, seed=7)
        t = time.time()
        before = evaluate(base, MODEL, qs, args.k, 0.8, args.max_tokens)
        print(f"base: {before} ({time.time() - t:.0f} s)", flush=True)
        results = {"before": before, "arms": {}, "args": vars(args)}
        for arm in args.arms.split(","):
            method, rollout = arm.split(":")
            name = f"{method}-{rollout}"
            reports = adapt(base, name, method, rollout, qs, args.batch, args.samples, args.steps, args.passes,
                            args.max_tokens)
            after = evaluate(base, f"{MODEL}:{name}", qs, args.k, 0.8, args.max_tokens)
            flat = [r for batch in reports for r in batch]
            episodes = [batch[0] for batch in reports]
            results["arms"][name] = {
                "after": after,
                "vote_share": sum(r["vote_share"] for r in flat) / len(flat),
                "rollout_tokens": sum(e["rollout_tokens"] for e in episodes),
                "flat_equivalent_tokens": sum(e["flat_equivalent_tokens"] for e in episodes),
                "seconds_per_episode": sum(e["duration_ms"] for e in episodes) / 1e3 / len(episodes),
                "rollbacks": sum(e["rolled_back"] for e in episodes),
                "final_version": episodes[-1]["adapter_version"],
            }
            print(f"{name}: {results['arms'][name]}", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        k = args.k
        print(f"\n| arm | pass@1 before -> after | maj@{k} before -> after | greedy before -> after | vote share |"
              f" length before -> after | rollout tokens / flat | s per episode | rollbacks |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in results["arms"].items():
            a = r["after"]
            print(f"| {name} | {before['pass@1']:.3f} -> {a['pass@1']:.3f} | {before[f'maj@{k}']:.3f} -> {a[f'maj@{k}']:.3f} |"
                  f" {before['greedy']:.3f} -> {a['greedy']:.3f} | {r['vote_share']:.3f} |"
                  f" {before['length']:.1f} -> {a['length']:.1f} |"
                  f" {r['rollout_tokens']} / {r['flat_equivalent_tokens']} ({r['rollout_tokens'] / max(1, r['flat_equivalent_tokens']):.0%}) |"
                  f" {r['seconds_per_episode']:.0f} | {r['rollbacks']} |")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
