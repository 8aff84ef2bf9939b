#!/usr/bin/env python3
"""One table for many `ttrl-serve eval` runs: each adapted arm's last pass against the base arm,
and the mean gain with its spread over runs (slices and seeds) of each family: the runs whose
folders differ only in a trailing `-s<seed>`, per protocol and arm.

    python3 scripts/eval_summary.py docs/eval/digits-online-vote-confidence-s1*

Each argument is a run's `--out` folder (or its results.json); a run without a base arm is
compared with the base arm of another given run of the same questions, k and seed. Columns: greedy, pass@1, maj@k and
mean length of the base arm, then of the adapted arm after its last pass; the gain in pass@1;
and, where the run has them, whether pass@1 reached the base maj@k, greedy held, and the length
stayed at 0.8x the base's or more. Standard library only."""

import json
import re
import statistics
import sys
from pathlib import Path


def load(arg):
    path = Path(arg)
    if path.is_dir():
        path = path / "results.json"
    return path, json.loads(path.read_text())


def last(arm):
    return max(arm["evaluations"], key=lambda e: e["episode"], default=None)


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def yes_no(ok):
    return "–" if ok is None else ("yes" if ok else "no")


SAME_QUESTIONS = ("protocol", "data_sha256", "skip", "questions", "k", "temperature", "max_tokens", "seed")


def base_evaluation(results):
    base = next((a for a in results["arms"] if a["arm"] == "base"), None)
    return next((e for e in base["evaluations"] if e["episode"] == 0), None) if base else None


def rows(runs):
    runs = list(runs)
    # A run made without a base arm takes the base arm of a run of the same questions and seed.
    bases = {}
    for _, results in runs:
        key = tuple(results["setup"].get(f) for f in SAME_QUESTIONS)
        if bases.get(key) is None:
            bases[key] = base_evaluation(results)
    for path, results in runs:
        setup = results["setup"]
        arms = {a["arm"]: a for a in results["arms"]}
        base_eval = bases[tuple(setup.get(f) for f in SAME_QUESTIONS)]
        for name, arm in arms.items():
            if name == "base":
                continue
            after = last(arm)
            if after is None:
                continue
            gain = after["pass_at_1"] - base_eval["pass_at_1"] if base_eval else None
            checks = (None, None, None)
            if base_eval:
                greedy_held = (
                    after["greedy"] >= base_eval["greedy"]
                    if after["greedy"] is not None and base_eval["greedy"] is not None
                    else None
                )
                checks = (
                    after["pass_at_1"] >= base_eval["maj_at_k"],
                    greedy_held,
                    after["mean_length"] >= 0.8 * base_eval["mean_length"],
                )
            yield {
                "run": path.parent.name,
                "protocol": setup["protocol"],
                "rows": f"{setup['skip'] + 1}-{setup['skip'] + setup['questions']}",
                "seed": setup["seed"],
                "arm": name,
                "passes": after["episode"],
                "base": base_eval,
                "after": after,
                "gain": gain,
                "checks": checks,
            }


def evaluation_cells(e):
    if e is None:
        return ["–"] * 4
    return [fmt(e["greedy"]), fmt(e["pass_at_1"]), fmt(e["maj_at_k"]), fmt(e["mean_length"], 1)]


def main(args):
    if not args:
        sys.exit(__doc__)
    table = list(rows(load(a) for a in args))
    print("| run | protocol | rows | seed | arm | passes | base: greedy, pass@1, maj, length "
          "| after: greedy, pass@1, maj, length | gain | pass@1 ≥ base maj | greedy held | length ≥ 0.8x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        base, after = evaluation_cells(r["base"]), evaluation_cells(r["after"])
        if r["base"]:
            after[3] += f" ({r['after']['mean_length'] / r['base']['mean_length']:.2f}x)"
        print(f"| {r['run']} | {r['protocol']} | {r['rows']} | {r['seed']} | {r['arm']} | {r['passes']} "
              f"| {', '.join(base)} | {', '.join(after)} | {fmt(r['gain'])} "
              f"| {' | '.join(yes_no(c) for c in r['checks'])} |")
    groups = {}
    for r in table:
        if r["gain"] is not None:
            family = re.sub(r"-s\d+$", "", r["run"])
            groups.setdefault((family, r["protocol"], r["arm"]), []).append(r["gain"])
    print()
    print("| runs (folder less its -sN) | protocol | arm | runs | pass@1 gain, mean ± sd |")
    print("|---|---|---|---|---|")
    for (family, protocol, arm), gains in sorted(groups.items()):
        sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
        print(f"| {family} | {protocol} | {arm} | {len(gains)} | {statistics.mean(gains):+.3f} ± {sd:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
