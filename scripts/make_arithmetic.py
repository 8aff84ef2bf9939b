#!/usr/bin/env python3
"""Writes data/arithmetic.jsonl: every single-digit addition and multiplication (1-9), once with
digits and once with number words, shuffled with a fixed seed. 324 rows of
{"question", "answer"}; the eval's online, transductive and held-out runs use it.

Also data/arithmetic-digits.jsonl: the 162 rows written with digits ("What is 7 plus 5?"), in the
same order. SmolLM2-135M-Instruct has its voting headroom there (pass@1 about 0.35-0.45 against
maj@16 0.75-0.88); with number words as operands it has little.

And data/arithmetic-explain.jsonl: the same digit rows asking for a short explanation before the
answer instead of just the number, to tell whether adaptation keeps an answer's length when the
question asks for the explanation."""
import json
import random
from pathlib import Path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPS = [("plus", lambda a, b: a + b), ("times", lambda a, b: a * b)]
JUST_THE_NUMBER = "Answer with just the number."


def main() -> None:
    rows = []
    for name, op in OPS:
        for a in range(1, 10):
            for b in range(1, 10):
                for spell in (str, WORDS.__getitem__):
                    rows.append({
                        "question": f"What is {spell(a)} {name} {spell(b)}? {JUST_THE_NUMBER}",
                        "answer": str(op(a, b)),
                    })
    random.Random(11).shuffle(rows)
    data = Path(__file__).resolve().parent.parent / "data"
    digits = [r for r in rows if r["question"].split()[2].isdigit()]
    explain = [
        {**r, "question": r["question"].replace(JUST_THE_NUMBER, "Explain briefly, then give the answer.")}
        for r in digits
    ]
    for name, subset in (
        ("arithmetic.jsonl", rows),
        ("arithmetic-digits.jsonl", digits),
        ("arithmetic-explain.jsonl", explain),
    ):
        out = data / name
        out.write_text("".join(json.dumps(r) + "\n" for r in subset))
        print(f"wrote {len(subset)} rows to {out}")


if __name__ == "__main__":
    main()
