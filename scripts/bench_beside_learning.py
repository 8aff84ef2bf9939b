#!/usr/bin/env python3
"""Serving beside learning, measured (stdlib only): 4 clients stream plain 128-token completions
back to back; first alone for --idle-seconds, then while a fifth client sends one adaptation
batch (8 questions at once, server defaults, each its own ephemeral episode). Prints plain-request
TTFT and TPOT (median / p99) for both phases and the adapted batch's end-to-end time.

    python3 scripts/bench_beside_learning.py http://127.0.0.1:8000 --label "after"
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from bench_serving import one

DATA = Path(__file__).resolve().parent.parent / "data" / "arithmetic.jsonl"


def adapted(base, question):
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0,
            "adaptation": {"enabled": True}}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.load(r)["adaptation"]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--label", default="ttrl-serve")
    args = ap.parse_args()
    questions = [json.loads(l)["question"] for l in DATA.read_text().splitlines()[: args.questions]]
    one(args.base, "", 4)  # warm-up
    results, lock, stop = [], threading.Lock(), threading.Event()

    def client():
        while not stop.is_set():
            started = time.time()
            r = one(args.base, "", 128)
            with lock:
                results.append((started, time.time(), r))

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.idle_seconds)
    batch_start = time.time()
    reports = [None] * len(questions)

    def ask(i):
        reports[i] = adapted(args.base, questions[i])

    askers = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in askers:
        t.start()
    for t in askers:
        t.join()
    batch_end = time.time()
    batch_seconds = batch_end - batch_start
    stop.set()
    for t in threads:
        t.join()
    print(f"| {args.label} | phase | plain requests | TTFT s p50 / p99 | TPOT s p50 / p99 |")
    print("|---|---|---|---|---|")
    # Idle: finished before the batch began. Adapting: ran (at least partly) while it ran.
    phases = {"idle": lambda s, e: e < batch_start, "adapting": lambda s, e: s < batch_end and e > batch_start}
    for name, during in phases.items():
        rs = [r for s, e, r in results if during(s, e)]
        if not rs:
            print(f"| {args.label} | {name} | 0 | - | - |")
            continue
        ttft, tpot = [r["ttft"] for r in rs], [r["tpot"] for r in rs]
        print(f"| {args.label} | {name} | {len(rs)} | {statistics.median(ttft):.3f} / {pct(ttft, 0.99):.3f} |"
              f" {statistics.median(tpot):.3f} / {pct(tpot, 0.99):.3f} |")
    applied = sum(1 for r in reports if r and r.get("applied"))
    print(f"\nadapted batch of {len(questions)}: {batch_seconds:.1f} s end to end, {applied} applied, "
          f"episode ms: {[r['duration_ms'] for r in reports if r]}", flush=True)


if __name__ == "__main__":
    main()
