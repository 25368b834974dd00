"""Write the unseen-wording test set of the chest-radiograph model.

Every test row of cxr-infection and jsrt gets its text replaced by a wording from the templates
below, chosen by the row's ``target``. These templates are used nowhere else: training never
sees them (``mrisegcli.data.paraphrase`` writes the training rewordings), and the script checks
that no text it writes equals a training text or any rewording training can produce. The
output is a manifest folder (test images and masks copied beside it) for ``mriseg evaluate``:

    python examples/cxr_paraphrase_testset.py --data ../shared/data --out work/paraphrase-test
    mriseg evaluate --data work/paraphrase-test --split test

It prints how many rows it wrote per kind and how many of their texts, after the tokenizer's
synonym folding, read the same as some training text (the synonym rules at work).
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from collections import Counter
from pathlib import Path

Z = {"upper": ["upper", "apical"], "middle": ["mid", "middle"], "lower": ["lower", "basal"]}
ABBR = {
    ("right", "upper"): "RUL",
    ("right", "middle"): "RML",
    ("right", "lower"): "RLL",
    ("left", "upper"): "LUL",
    ("left", "middle"): "lingula",
    ("left", "lower"): "LLL",
}
PLACE = {"upper": "apex", "middle": "mid lung", "lower": "base"}

INFECTION_ALL = [
    "opacities consistent with covid-19",
    "where is the pneumonia?",
    "all regions of airspace opacification",
    "covid pneumonia, every affected region",
    "infected lung regions",
    "diffuse ground glass changes",
]
SIDE = [
    "{s}-sided consolidation",
    "opacification of the {s} hemithorax",
    "infiltrates involving the {s} lung",
    "pneumonia affecting the {s} lung",
    "airspace disease on the {s} side",
    "{s} sided ggo",
]
BOTH_SIDES = [
    "bilateral consolidation",
    "opacities involving both lungs",
    "pneumonia affecting the two lungs",
    "bilateral airspace disease",
    "ggo on both sides",
]
ZONE = [
    "ground-glass opacity in the {s} {z} zone",
    "{s} {z} lobe opacity",
    "consolidation at the {s} {place}",
    "{z} {s} lung opacification",
    "infiltrate in the {abbr}",
    "patchy airspace disease, {s} {z} zone",
]
BOTH_ZONE = [
    "bilateral {z} lobe opacity",
    "{z}-zone opacities on both sides",
    "ground-glass opacity in both {z} lung zones",
    "consolidation in the {z} zones bilaterally",
    "{z} zone infiltrates in each lung",
]
LUNG = [
    "the {s} lung field",
    "{s} pulmonary field",
    "lung on the {s}",
    "{s} lung parenchyma",
    "outline the {s} lung",
]
LUNGS = [
    "the two lungs",
    "lung parenchyma",
    "pulmonary fields bilaterally",
    "both hemithoraces",
    "left and right lungs",
]
HEART = [
    "cardiac silhouette",
    "silhouette of the heart",
    "heart region",
    "the cardiac outline",
    "where is the heart",
]
CLAVICLE = [
    "{s} clavicle bone",
    "the clavicle on the {s} side",
    "{s} collar bone",
    "{s} clavicular region",
    "bone of the {s} shoulder girdle, the clavicle",
]
NODULE = [
    "pulmonary nodule in the {s} {z} lung field",
    "{s} {z} lobe mass",
    "solitary nodule, {s} {z} zone",
    "nodular lesion in the {abbr}",
    "a {s} {z} zone nodule",
]
NODULE_SIDE = [
    "pulmonary nodule in the {s} lung field",
    "{s} lung mass",
    "solitary {s} nodule",
    "nodular lesion on the {s}",
    "a nodule in the {s} lung",
]


def reword(target: str, rng: random.Random) -> str | None:
    """An unseen wording of ``target`` (the manifest grammar); None for targets it lacks."""
    t = target.strip().lower()
    parts = t.split(":")
    if t == "none":  # a normal chest asked for a finding: any infection wording
        return reword(
            rng.choice(
                [
                    "infection:all",
                    "infection:left",
                    "infection:right",
                    "infection:right:lower",
                    "infection:left+right:lower",
                ]
            ),
            rng,
        )
    if parts[0] == "infection":
        if parts[1] == "all":
            return rng.choice(INFECTION_ALL)
        sides = parts[1].split("+")
        zone = parts[2] if len(parts) > 2 else ""
        if len(sides) == 2:
            return (
                rng.choice(BOTH_ZONE).format(z=rng.choice(Z[zone]))
                if zone
                else rng.choice(BOTH_SIDES)
            )
        s = sides[0]
        if not zone:
            return rng.choice(SIDE).format(s=s)
        return rng.choice(ZONE).format(
            s=s, z=rng.choice(Z[zone]), place=PLACE[zone], abbr=ABBR[(s, zone)]
        )
    if parts[0] == "lung":
        return rng.choice(LUNGS) if parts[1] == "both" else rng.choice(LUNG).format(s=parts[1])
    if t in ("left_lung", "right_lung"):
        return rng.choice(LUNG).format(s=t.split("_")[0])
    if t == "heart":
        return rng.choice(HEART)
    if t in ("left_clavicle", "right_clavicle"):
        return rng.choice(CLAVICLE).format(s=t.split("_")[0])
    if parts[0] == "nodule":
        s, zone = parts[1], parts[2] if len(parts) > 2 else ""
        if not zone:
            return rng.choice(NODULE_SIDE).format(s=s)
        return rng.choice(NODULE).format(s=s, z=rng.choice(Z[zone]), abbr=ABBR[(s, zone)])
    return None


def _kind(dataset: str, row: dict) -> str:
    """The row's kind; jsrt rows are named by organ ("jsrt heart") or "jsrt nodule"."""
    if dataset != "jsrt":
        return row["kind"]
    return "jsrt nodule" if row["kind"] == "nodule" else f"jsrt {row['target'].replace('_', ' ')}"


def training_wordings(rows: list[dict], samples: int = 400) -> set[str]:
    """Every training text plus every rewording the training paraphraser can produce (sampled
    until no new one appears in ``samples`` draws per target)."""
    from mrisegcli.data.paraphrase import paraphrase

    seen = {r["text"].strip().lower() for r in rows if r["split"] == "train"}
    for target in {r["target"] for r in rows}:
        rng, misses = random.Random(target), 0
        while misses < samples:
            text = paraphrase(target, rng)
            if text is None:
                break
            key = text.strip().lower()
            misses = misses + 1 if key in seen else 0
            seen.add(key)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--datasets", nargs="+", default=["cxr-infection", "jsrt"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {args.out}: not empty (use --overwrite)")
    from mrisegcli.tokenizers.text import text_normalizer

    normalise = text_normalizer()
    out_rows, counts, folded = [], Counter(), Counter()
    for name in args.datasets:
        src = args.data / name
        with open(src / "manifest.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        seen = training_wordings(rows)
        seen_norm = {" ".join(normalise(t).split()) for t in seen}
        rng = random.Random(f"{args.seed}-{name}")
        for r in rows:
            if r["split"] != "test":
                continue
            text = reword(r["target"], rng)
            if text is None:
                raise SystemExit(f"error: no unseen wording for target {r['target']!r}")
            if text.lower() in seen:
                raise SystemExit(f"error: {text!r} is a training wording; change the templates")
            for col in ("image", "mask"):
                dst = args.out / name / r[col]
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    shutil.copyfile(src / r[col], dst)
            out_rows.append(
                {
                    "image": f"{name}/{r['image']}",
                    "mask": f"{name}/{r['mask']}",
                    "text": text,
                    "split": "test",
                    "kind": _kind(name, r),
                    "target": r["target"],
                }
            )
            counts[out_rows[-1]["kind"]] += 1
            folded[out_rows[-1]["kind"]] += " ".join(normalise(text).split()) in seen_norm
    with open(args.out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "mask", "text", "split", "kind", "target"])
        w.writeheader()
        w.writerows(out_rows)
    print(f"wrote {len(out_rows)} test rows with unseen wordings to {args.out / 'manifest.csv'}")
    for kind, n in sorted(counts.items()):
        print(f"  {kind}: {n} rows, {folded[kind]} read like a training text after synonym folding")


if __name__ == "__main__":
    main()
