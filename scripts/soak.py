#!/usr/bin/env python3
"""A bounded soak on loopback (stdlib only): `--clients` threads from 4 tenants send, for
`--seconds`, a mix of plain chat requests, ephemeral adaptation and named-adapter training and
use, each tenant with its own key. Then it waits for what is in flight and reports: responses by
status (goal: no 5xx), server RSS at start, peak and end, whether every adapter's reported
versions only grew, and `ttrl_requests_waiting` at the end (goal: 0).

    python3 scripts/soak.py http://127.0.0.1:8104 --pid PID --keys k0,k1,k2,k3 --model NAME
"""
import argparse
import collections
import json
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "arithmetic.jsonl"
ADAPTERS = ["a", "b"]


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(base, key, body, timeout):
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def metric(base, name):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name) and l[len(name)] in "{ ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--keys", required=True, help="one API key per tenant, comma-separated")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args()
    keys = args.keys.split(",")
    questions = [json.loads(l)["question"] for l in DATA.read_text().splitlines()]
    statuses, errors = collections.Counter(), collections.Counter()
    versions = collections.defaultdict(list)  # (tenant, adapter) -> [(finished, version)]
    lock = threading.Lock()
    deadline = time.time() + args.seconds
    rss = {"start": rss_mib(args.pid), "peak": 0.0}

    def client(i):
        rng = random.Random(i)
        tenant = i % len(keys)
        while time.time() < deadline:
            q = rng.choice(questions)
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": 16, "seed": rng.randrange(1 << 30)}
            kind = rng.choices(["plain", "ephemeral", "train", "use"], weights=[5, 2, 2, 2])[0]
            name = rng.choice(ADAPTERS)
            if kind == "ephemeral":
                body["adaptation"] = {"enabled": True}
            elif kind == "train":
                body["adaptation"] = {"enabled": True, "adapter": name}
            elif kind == "use":
                body["model"] = f"{args.model}:{name}"
            try:
                status, r = post(args.base, keys[tenant], body, args.timeout)
            except Exception as e:  # a timeout or a dropped connection counts against the server
                with lock:
                    errors[type(e).__name__] += 1
                continue
            with lock:
                statuses[(kind, status)] += 1
                if status >= 500:
                    errors[r.get("error", {}).get("message", "?")[:120]] += 1
                report = r.get("adaptation") or {}
                if kind == "train" and status == 200 and "adapter_version" in report:
                    versions[(tenant, name)].append((time.time(), report["adapter_version"]))

    def watch():
        while time.time() < deadline + args.timeout:
            rss["peak"] = max(rss["peak"], rss_mib(args.pid))
            time.sleep(5)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threading.Thread(target=watch, daemon=True).start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(2)
    rss["end"] = rss_mib(args.pid)
    non_monotonic = sum(1 for seen in versions.values() for (_, a), (_, b) in zip(sorted(seen), sorted(seen)[1:]) if b < a)
    print("| soak measurement | value |")
    print("|---|---|")
    for (kind, status), n in sorted(statuses.items()):
        print(f"| {kind} requests answered {status} | {n} |")
    five = sum(n for (_, s), n in statuses.items() if s >= 500)
    print(f"| 5xx responses | {five} |")
    for what, n in errors.items():
        print(f"| error: {what} | {n} |")
    print(f"| adapters trained (tenant, name) | {len(versions)} |")
    print(f"| highest version reached | {max((v for seen in versions.values() for _, v in seen), default=0)} |")
    print(f"| versions that went backwards | {non_monotonic} |")
    print(f"| server RSS start / peak / end (MiB) | {rss['start']:.0f} / {rss['peak']:.0f} / {rss['end']:.0f} |")
    print(f"| ttrl_requests_waiting at the end | {metric(args.base, 'ttrl_requests_waiting'):.0f} |")
    resident, stored = (metric(args.base, 'ttrl_adapters{state="%s"}' % s) for s in ("resident", "stored"))
    print(f"| resident / stored adapters at the end | {resident:.0f} / {stored:.0f} |")


if __name__ == "__main__":
    main()
