"""What the presence gate costs and buys, and whether the decoded mask could decide instead.

Reads the per-case CSV of an evaluation with the gate off, so that every row carries the mask
the decoder drew and the model's presence score:

    mriseg evaluate --model chest-xray --data ../shared/data/cxr-infection --split val \\
        --presence-threshold 0 --csv val.csv
    python bench/presence_gate_cost.py val.csv test.csv --threshold 0.920

and prints per file: present findings found and empty truths drawn without the gate and at the
threshold, the Dice of present findings both ways (per kind), and for the present findings the
gate empties and the empty truths the decoder draws: their drawn area and presence score. When
those two groups overlap in area, the decoded mask cannot tell them apart either.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def load(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or rows[0].get("presence", "") == "":
        raise SystemExit(f"{path}: no presence column (evaluate a model that has a presence head)")
    return {
        "presence": np.array([float(r["presence"]) for r in rows]),
        "area": np.array([int(r["pred_pixels"]) for r in rows]),
        "gt": np.array([int(r["gt_pixels"]) for r in rows]),
        "dice": np.array([float(r["dice"]) for r in rows]),
        "kind": np.array([r["kind"] for r in rows]),
    }


def _q(x: np.ndarray) -> str:
    if not len(x):
        return "-"
    return " / ".join(f"{v:.3g}" for v in np.quantile(x, [0.0, 0.5, 1.0]))


def report(d: dict[str, np.ndarray], threshold: float) -> list[str]:
    present, drawn = d["gt"] > 0, d["area"] > 0
    kept = d["presence"] >= threshold
    gated_dice = np.where(kept, d["dice"], 0.0)  # a present finding gated away scores 0
    lines = [
        f"  rows {len(present)}: {int(present.sum())} present, {int((~present).sum())} empty truths",
        f"  found: {drawn[present].mean():.1%} without the gate, "
        f"{(drawn & kept)[present].mean():.1%} at {threshold:.3f}",
        f"  empty truths drawn: {int(drawn[~present].sum())} without the gate, "
        f"{int((drawn & kept)[~present].sum())} at the threshold",
    ]
    for kind in sorted(set(d["kind"][present])):
        sel = present & (d["kind"] == kind)
        lines.append(
            f"  Dice of present findings, {kind or 'all'} ({int(sel.sum())}): "
            f"{d['dice'][sel].mean():.3f} without the gate, {gated_dice[sel].mean():.3f} with it"
        )
    lost = present & drawn & ~kept
    false = ~present & drawn
    lines += [
        f"  present findings the gate empties ({int(lost.sum())}): area min/median/max "
        f"{_q(d['area'][lost])} px, presence {_q(d['presence'][lost])}",
        f"  empty truths the decoder draws ({int(false.sum())}): area {_q(d['area'][false])} px, "
        f"presence {_q(d['presence'][false])}",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("csv", type=Path, nargs="+", help="evaluate --presence-threshold 0 --csv files")
    ap.add_argument("--threshold", type=float, required=True, help="the model's presence threshold")
    args = ap.parse_args()
    for path in args.csv:
        print(path.name)
        print("\n".join(report(load(path), args.threshold)))


if __name__ == "__main__":
    main()
