"""Where does a wording lose? The same test cases asked in two wordings, compared per kind and
per prompt, with the prompts ``predict`` would refuse counted apart.

Reads the per-case CSVs of two ``mriseg evaluate --model M --csv`` runs: one on the test split
in its own wording (``--canonical``, one or more files: e.g. cxr-infection and jsrt) and one
on the same cases reworded (``--reworded``: e.g. ``examples/report_wording_testset.py``'s
set). Cases are paired by their mask's file name. For each kind: the Dice of both wordings on
all cases and on the cases whose reworded prompt is in the model's scope (``in_scope``), and
for each reworded prompt its mean Dice change, largest loss first.

    mriseg evaluate --model chest-xray --data ../shared/data/cxr-infection --csv canon.csv
    mriseg evaluate --model chest-xray --data work/report-wording/chest --csv reworded.csv
    python examples/wording_by_template.py --canonical canon.csv --reworded reworded.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path


def read_cases(paths: list[Path]) -> dict[str, dict[str, str]]:
    """Rows of evaluate CSVs keyed by their mask's file name (an error when one repeats)."""
    out: dict[str, dict[str, str]] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and "text" not in rows[0]:
            sys.exit(f"{path}: no text column (written by an older mriseg evaluate)")
        for r in rows:
            key = Path(r["gt"]).name
            if key in out:
                sys.exit(f"{path}: mask {key} appears twice; cases are paired by mask file name")
            out[key] = r
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _block(pairs: list[tuple[dict[str, str], dict[str, str]]]) -> dict[str, object]:
    return {
        "n": len(pairs),
        "canonical": _mean([float(c["dice"]) for c, _ in pairs]),
        "reworded": _mean([float(r["dice"]) for _, r in pairs]),
    }


def compare(canon: dict[str, dict[str, str]], reworded: dict[str, dict[str, str]]) -> dict:
    """Per kind: both wordings on all paired cases, on those in scope and on those refused;
    per reworded prompt: its cases' mean Dice change (reworded - canonical)."""
    missing = sorted(set(reworded) - set(canon))
    if missing:
        sys.exit(f"{len(missing)} reworded case(s) without a canonical one, e.g. {missing[0]}")
    kinds: dict[str, list] = defaultdict(list)
    prompts: dict[tuple[str, str], list] = defaultdict(list)
    for key, r in reworded.items():
        pair = (canon[key], r)
        kinds[r["kind"]].append(pair)
        prompts[(r["kind"], r["text"])].append(pair)
    out: dict[str, object] = {"kinds": {}, "prompts": []}
    for kind, pairs in sorted(kinds.items()):
        out["kinds"][kind] = {
            "all": _block(pairs),
            "in_scope": _block([p for p in pairs if p[1].get("in_scope") != "0"]),
            "refused": _block([p for p in pairs if p[1].get("in_scope") == "0"]),
        }
    for (kind, text), pairs in prompts.items():
        b = _block(pairs)
        out["prompts"].append(
            {
                "kind": kind,
                "text": text,
                "n": b["n"],
                "in_scope": pairs[0][1].get("in_scope") != "0",
                "change": b["reworded"] - b["canonical"],
            }
        )
    out["prompts"].sort(key=lambda p: p["change"])
    return out


def _fmt(block: dict[str, object]) -> str:
    if not block["n"]:
        return "-"
    change = block["reworded"] - block["canonical"]
    return f"{block['reworded']:.3f} vs {block['canonical']:.3f} ({change:+.3f}, n={block['n']})"


def print_report(result: dict, top: int) -> None:
    print("kind: reworded vs canonical Dice on all cases | in scope | refused by predict")
    for kind, k in result["kinds"].items():
        print(f"  {kind}: {_fmt(k['all'])} | {_fmt(k['in_scope'])} | {_fmt(k['refused'])}")
    print(f"the {top} reworded prompts that lose most (mean Dice change):")
    for p in result["prompts"][:top]:
        scope = "" if p["in_scope"] else "  [refused by predict]"
        print(f"  {p['change']:+.3f}  n={p['n']:<3} {p['kind']}: {p['text']!r}{scope}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--canonical", type=Path, action="append", required=True)
    ap.add_argument("--reworded", type=Path, required=True)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the result to this file")
    args = ap.parse_args(argv)
    result = compare(read_cases(args.canonical), read_cases([args.reworded]))
    print_report(result, args.top)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
