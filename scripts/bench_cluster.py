#!/usr/bin/env python3
"""Requests per second and latency (p50, p99) of short chat requests, plain and with named
adapters, against one server or a proxy in front of several (stdlib only); and, with --failover,
the seconds from killing the replica that serves an adapter to that adapter being served again.

    python3 bench_cluster.py http://127.0.0.1:8100 --clients 8 --seconds 60 --admin-key KEY
    python3 bench_cluster.py http://127.0.0.1:8100 --failover --pid-dir ~/.cache/ttrl-serve/cluster --admin-key KEY
"""
import argparse
import json
import os
import signal
import statistics
import threading
import time
import urllib.request

MODEL = "SmolLM2-135M-Instruct"


def chat(base, adapter=None, question="What is 3 plus 4?", max_tokens=16, timeout=600):
    model = f"{MODEL}:{adapter}" if adapter else MODEL
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0.7, "ignore_eos": True}
    headers = {"content-type": "application/json"}
    if adapter:
        headers["x-ttrl-adapter"] = adapter
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
        return r.headers.get("x-ttrl-replica")


def reset(base, key, name):
    req = urllib.request.Request(f"{base}/admin/adapters/{name}/reset", method="POST",
                                 headers={"authorization": f"Bearer {key}"})
    urllib.request.urlopen(req, timeout=60).read()


def load(base, clients, seconds, adapters):
    latencies, errors, lock = [], [0], threading.Lock()
    stop = time.time() + seconds

    def client(i):
        n = 0
        while time.time() < stop:
            adapter = adapters[(i + n) % len(adapters)] if adapters else None
            n += 1
            start = time.time()
            try:
                chat(base, adapter)
                with lock:
                    latencies.append(time.time() - start)
            except Exception:
                with lock:
                    errors[0] += 1
    started = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    return {"requests": len(latencies), "errors": errors[0], "rps": len(latencies) / wall,
            "p50_s": statistics.median(latencies) if latencies else float("nan"), "p99_s": p99}


def failover(base, pid_dir, key):
    adapter = "failover-probe"
    reset(base, key, adapter)
    replica = chat(base, adapter)
    pid = int(open(os.path.join(pid_dir, f"replica-{replica.lstrip('r')}.pid")).read())
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    while True:
        try:
            other = chat(base, adapter, timeout=30)
            return {"killed": replica, "served_by": other, "seconds": time.time() - killed}
        except Exception:
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--adapters", type=int, default=6, help="named adapters for the adapter traffic")
    ap.add_argument("--admin-key")
    ap.add_argument("--label", default="")
    ap.add_argument("--failover", action="store_true")
    ap.add_argument("--pid-dir")
    a = ap.parse_args()
    if a.failover:
        print(json.dumps({"label": a.label, "failover": failover(a.base, a.pid_dir, a.admin_key)}))
        return
    names = [f"bench-{i}" for i in range(a.adapters)]
    for name in names:
        reset(a.base, a.admin_key, name)
    for kind, adapters in (("plain", []), ("named", names)):
        print(json.dumps({"label": a.label, "traffic": kind, **load(a.base, a.clients, a.seconds, adapters)}), flush=True)


if __name__ == "__main__":
    main()
