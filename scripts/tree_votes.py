#!/usr/bin/env python3
"""Where a tree's vote comes from: its roots, its branches, and how branches follow their parents.

`collect` sends each question once to a running ttrl-serve with ephemeral adaptation and one
round (waves of 8 concurrent requests, as `ttrl-serve eval --protocol online` sends them) and
keeps the leaves the response's adaptation report lists: the first round's leaves, voted before
any update, each with its tokens' mean entropy. `report` reads a tree file and a flat file of
the same questions and seeds; `--vote-confidence` also counts the votes weighed by confidence.

    python3 scripts/tree_votes.py collect --rollout tree --data data/arithmetic-digits.jsonl \
        --limit 96 --seed 7 --out tree.jsonl
    python3 scripts/tree_votes.py collect --rollout flat ... --out flat.jsonl
    python3 scripts/tree_votes.py report tree.jsonl flat.jsonl

Standard library only.
"""
import argparse
import collections
import concurrent.futures
import json
import math
import random
import statistics
import urllib.request

WAVE = 8


def collect(args):
    rows = [json.loads(line) for line in open(args.data)][args.skip : args.skip + args.limit]

    def ask(i):
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": rows[i]["question"]}],
            "max_tokens": 1,
            "temperature": 0.8,
            "seed": args.seed + i,
            "adaptation": {"enabled": True, "rollout": args.rollout, "steps": 1},
        }
        request = urllib.request.Request(
            f"{args.url}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        report = json.load(urllib.request.urlopen(request, timeout=3600))["adaptation"]
        leaves = [
            {
                "parent": leaf["parent"],
                "fork_at": leaf["fork_at"],
                "tokens": len(leaf["tokens"]),
                "answer": leaf["answer"],
                "truncated": leaf["truncated"],
                "mean_entropy": round(statistics.mean(leaf["entropies"] or [0.0]), 4),
            }
            for leaf in report["tree"]
        ]
        return {
            "row": args.skip + i + 1,
            "gold": rows[i]["answer"],
            "majority": report["majority_answer"],
            "rollout_tokens": report["rollout_tokens"],
            "flat_equivalent_tokens": report["flat_equivalent_tokens"],
            "leaves": leaves,
        }

    with open(args.out, "w") as out:
        for start in range(0, len(rows), WAVE):
            with concurrent.futures.ThreadPoolExecutor(WAVE) as pool:
                for result in pool.map(ask, range(start, min(start + WAVE, len(rows)))):
                    out.write(json.dumps(result) + "\n")
            print(f"questions {start + 1}-{min(start + WAVE, len(rows))} done", flush=True)


def normal(answer):
    return answer.strip().rstrip(".").lower()


def same(answer, gold):
    return answer is not None and normal(answer) == normal(gold)


def right(leaf, gold):
    return not leaf["truncated"] and same(leaf["answer"], gold)


def weight(leaf, confidence):
    """A leaf's weight in the vote: exp(-confidence x its mean token entropy), as the server's
    `vote_confidence` weighs it; 0 counts every leaf 1."""
    return math.exp(-confidence * leaf.get("mean_entropy", 0.0))


def vote(leaves, gold, confidence=0.0):
    """Chance that the answer the finished leaves weigh most is the gold answer (ties split)."""
    weights = collections.defaultdict(float)
    for leaf in leaves:
        if not leaf["truncated"] and leaf["answer"]:
            weights[normal(leaf["answer"])] += weight(leaf, confidence)
    if not weights:
        return 0.0
    top = max(weights.values())
    tied = [a for a, w in weights.items() if w == top]
    return sum(same(a, gold) for a in tied) / len(tied)


def describe(name, leaves):
    n = len(leaves)
    print(
        f"  {name}: {n} leaves, right {sum(ok for ok, _, _ in leaves) / n:.3f}, "
        f"cut off {sum(cut for _, cut, _ in leaves) / n:.3f}, "
        f"mean length {statistics.mean(t for _, _, t in leaves):.1f}"
    )


def report(args):
    trees = [json.loads(line) for line in open(args.tree)]
    flats = [json.loads(line) for line in open(args.flat)]
    for name, runs in (("tree", trees), ("flat", flats)):
        sampled = sum(r["rollout_tokens"] for r in runs)
        print(
            f"{name}: {len(runs)} questions, first votes right {sum(vote(r['leaves'], r['gold']) for r in runs):.1f}, "
            f"tokens {sampled}, {sampled / sum(r['flat_equivalent_tokens'] for r in runs):.3f} of its flat equivalent"
        )
        if args.vote_confidence:
            weighed = sum(vote(r["leaves"], r["gold"], args.vote_confidence) for r in runs)
            print(f"  weighed by confidence ({args.vote_confidence}): first votes right {weighed:.1f}")
    roots, branches = [], []
    by_parent = collections.defaultdict(list)
    for r in trees:
        for leaf in r["leaves"]:
            entry = (right(leaf, r["gold"]), leaf["truncated"], leaf["tokens"])
            if leaf["parent"] is None:
                roots.append(entry)
                continue
            branches.append(entry)
            parent = r["leaves"][leaf["parent"]]
            kind = "cut off" if parent["truncated"] else ("right" if right(parent, r["gold"]) else "wrong")
            by_parent[kind].append(entry)
    describe("tree roots", roots)
    describe("tree branches", branches)
    for kind in ("right", "wrong", "cut off"):
        describe(f"branches of a {kind} parent", by_parent[kind])
    describe("flat leaves", [(right(l, r["gold"]), l["truncated"], l["tokens"]) for r in flats for l in r["leaves"]])
    roots_vote = sum(vote([l for l in r["leaves"] if l["parent"] is None], r["gold"]) for r in trees)
    print(f"tree, its roots' vote alone: {roots_vote:.1f} right")
    rng = random.Random(0)
    sizes = sorted({4, 8, 12, 16, 20, 24, 28, min(len(r["leaves"]) for r in flats)})
    for k in sizes:
        expected = sum(
            statistics.mean(vote(rng.sample(r["leaves"], k), r["gold"]) for _ in range(args.draws))
            for r in flats
        )
        print(f"flat, {k:2} of its leaves drawn at random: {expected:.1f} right (expected)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--url", default="http://127.0.0.1:8000")
    c.add_argument("--model", default="SmolLM2-135M-Instruct")
    c.add_argument("--data", required=True)
    c.add_argument("--skip", type=int, default=0)
    c.add_argument("--limit", type=int, default=32)
    c.add_argument("--rollout", choices=("tree", "flat"), required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("tree")
    r.add_argument("flat")
    r.add_argument("--draws", type=int, default=200)
    r.add_argument(
        "--vote-confidence",
        type=float,
        default=0.0,
        help="also count the votes weighed as the server's vote_confidence weighs them (needs leaves collected with their mean entropy)",
    )
    args = parser.parse_args()
    collect(args) if args.command == "collect" else report(args)


if __name__ == "__main__":
    main()
