"""Two shipped models' test numbers side by side: detection and Dice per kind, as Markdown.

    python examples/compare_shipped_evaluations.py OLD/evaluation.json NEW/evaluation.json

Each file is the ``evaluation.json`` that ``examples/ship_cxr_model.py`` writes beside a model
(``git show HEAD:src/mrisegcli/shipped/chest-xray/evaluation.json > old.json`` gives the shipped
one). Rows: every kind of the detection report (found, Dice of present findings, empty truths
drawn), then Dice per kind with the canonical, unseen and report wordings, then the volumes
(a brain model's ``evaluation.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def _pair(old: dict, new: dict, key: str, pct: bool = False) -> str:
    return f"{_f(old.get(key), pct)} / {_f(new.get(key), pct)}"


def detection_rows(old: dict, new: dict) -> list[str]:
    do, dn = old.get("detection", {}), new.get("detection", {})
    rows = [
        "| detection (old / new) | AUROC | found | Dice of present | empty drawn |",
        "|---|---|---|---|---|",
        f"| all | {_pair(do, dn, 'auroc')} | {_pair(do, dn, 'found', True)} | "
        f"{_pair(do, dn, 'dice_present')} | {_pair(do, dn, 'drawn_on_empty', True)} |",
    ]
    kinds = sorted(set(do.get("kinds", {})) | set(dn.get("kinds", {})))
    for k in kinds:
        o, n = do.get("kinds", {}).get(k, {}), dn.get("kinds", {}).get(k, {})
        rows.append(
            f"| {k} | - | {_pair(o, n, 'found', True)} | {_pair(o, n, 'dice_present')} | "
            f"{_pair(o, n, 'drawn_on_empty', True)} |"
        )
    return rows


def dice_rows(old: dict, new: dict) -> list[str]:
    rows = [
        "| Dice (old / new) | training wording | unseen wording | report wording |",
        "|---|---|---|---|",
    ]
    kinds = sorted(set(old.get("kinds", {})) | set(new.get("kinds", {})))
    for k in kinds:
        cells = []
        for part in ("kinds", "unseen_wording", "report_wording"):
            o, n = old.get(part, {}).get(k, {}), new.get(part, {}).get(k, {})
            cells.append(_pair(o, n, "dice"))
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return rows


def volume_rows(old: dict, new: dict) -> list[str]:
    vo, vn = old.get("volumes"), new.get("volumes")
    if not (vo or vn):
        return []
    vo, vn = vo or {}, vn or {}
    return [
        "| volumes (old / new) | Dice | median Dice | HD95 mm | abs. volume difference mL |",
        "|---|---|---|---|---|",
        f"| {vo.get('n', '-')} / {vn.get('n', '-')} | {_pair(vo, vn, 'dice')} | "
        f"{_pair(vo, vn, 'dice_median')} | {_pair(vo, vn, 'hd95_mm')} | {_pair(vo, vn, 'avd_ml')} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args()
    old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
    print("\n".join(detection_rows(old, new)))
    print()
    print("\n".join(dice_rows(old, new)))
    vols = volume_rows(old, new)
    if vols:
        print()
        print("\n".join(vols))


if __name__ == "__main__":
    main()
