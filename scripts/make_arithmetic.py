#!/usr/bin/env python3
"""Writes data/arithmetic.jsonl: every single-digit addition and multiplication (1-9), once with
digits and once with number words, shuffled with a fixed seed. 324 rows of
{"question", "answer"}; the eval's online, transductive and held-out runs use it."""
import json
import random
from pathlib import Path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPS = [("plus", lambda a, b: a + b), ("times", lambda a, b: a * b)]


def main() -> None:
    rows = []
    for name, op in OPS:
        for a in range(1, 10):
            for b in range(1, 10):
                for spell in (str, WORDS.__getitem__):
                    rows.append({
                        "question": f"What is {spell(a)} {name} {spell(b)}? Answer with just the number.",
                        "answer": str(op(a, b)),
                    })
    random.Random(11).shuffle(rows)
    out = Path(__file__).resolve().parent.parent / "data" / "arithmetic.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
