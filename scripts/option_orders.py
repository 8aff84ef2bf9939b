#!/usr/bin/env python3
"""Does a multiple-choice majority follow the option or its place in the list?

`reverse` writes a question file with each question's options in reverse order under the same
letters (the gold letter moved with its option). Collect the first-round leaves of both files
with `scripts/tree_votes.py collect --rollout flat` (same rows, same seed), then `report` reads
every reversed leaf's letter back to the option it names and counts, per question, whether
the two orders put the same option on top, and how often a majority that passes the
multiple-choice gate (a top share of at least 0.475 of the leaves) is the gold option.

    python3 scripts/option_orders.py reverse --data arc-easy.jsonl --out arc-reversed.jsonl
    python3 scripts/tree_votes.py collect --rollout flat --data arc-easy.jsonl --skip 56 \\
        --limit 64 --seed 7 --out listed.jsonl
    python3 scripts/tree_votes.py collect --rollout flat --data arc-reversed.jsonl --skip 56 \\
        --limit 64 --seed 7 --out reversed.jsonl
    python3 scripts/option_orders.py report --data arc-easy.jsonl listed.jsonl reversed.jsonl

Standard library only.
"""
import argparse
import collections
import json
import re

LETTERS = "ABCDE"
OPTION = re.compile(r"^([A-E])\. (.*)$")
GATE = 0.475


def reverse(args):
    with open(args.data) as rows, open(args.out, "w") as out:
        for line in rows:
            row = json.loads(line)
            lines = row["question"].split("\n")
            at = [i for i, l in enumerate(lines) if OPTION.match(l)]
            contents = [OPTION.match(lines[i]).group(2) for i in at]
            for j, i in enumerate(at):
                lines[i] = f"{LETTERS[j]}. {contents[len(at) - 1 - j]}"
            gold = LETTERS[len(at) - 1 - LETTERS.index(row["answer"])]
            out.write(json.dumps({"question": "\n".join(lines), "answer": gold}) + "\n")


def options(leaves, reversed_order, k):
    """Each answering leaf's option among the question's k, as the question lists it."""
    named = []
    for leaf in leaves:
        letter = leaf["answer"]
        if leaf["truncated"] or not letter or letter not in LETTERS[:k]:
            continue
        i = LETTERS.index(letter)
        named.append(LETTERS[k - 1 - i] if reversed_order else letter)
    return collections.Counter(named)


def top(counts):
    ranked = counts.most_common(2)
    if not ranked or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        return None, 0
    return ranked[0]


def report(args):
    questions = [json.loads(l)["question"] for l in open(args.data)]
    listed = [json.loads(l) for l in open(args.listed)]
    flipped = [json.loads(l) for l in open(args.reversed)]
    tally = collections.Counter()
    for a, r in zip(listed, flipped):
        assert a["row"] == r["row"], "the two files must hold the same rows"
        gold = a["gold"]
        k = sum(1 for l in questions[a["row"] - 1].split("\n") if OPTION.match(l))
        first, second = options(a["leaves"], False, k), options(r["leaves"], True, k)
        (lt, ln), (rt, rn) = top(first), top(second)
        (pt, pn) = top(first + second)
        tally["questions"] += 1
        tally["listed order: top option right"] += lt == gold
        tally["reversed order: top option right"] += rt == gold
        tally["both orders: same top option"] += lt is not None and lt == rt
        tally["both orders: same top option, and right"] += lt is not None and lt == rt == gold
        if lt and ln / len(a["leaves"]) >= GATE:
            tally["listed order passes the gate"] += 1
            tally["listed order passes the gate, right"] += lt == gold
        votes = len(a["leaves"]) + len(r["leaves"])
        if pt and pn / votes >= GATE and lt == rt:
            tally["both orders pass the gate and agree"] += 1
            tally["both orders pass the gate and agree, right"] += pt == gold
    width = max(len(k) for k in tally)
    for key, value in tally.items():
        print(f"{key:<{width}}  {value}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rev = commands.add_parser("reverse")
    rev.add_argument("--data", required=True)
    rev.add_argument("--out", required=True)
    rep = commands.add_parser("report")
    rep.add_argument("--data", required=True, help="the question file the rows come from")
    rep.add_argument("listed")
    rep.add_argument("reversed")
    args = parser.parse_args()
    {"reverse": reverse, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
