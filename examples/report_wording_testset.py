"""Write a test set in the words of radiology reports: every test row reworded from its target.

The templates below are written from public references, not from the training texts: for the
chest, the Fleischner Society glossary of terms for thoracic imaging (airspace, consolidation,
ground-glass opacity, opacification, nodule and mass, hemithorax, zones and lobes, the
abbreviated lobes) and the way chest-radiograph reports phrase COVID-19 pneumonia; for the brain,
the words neuroradiology reports use for a lower-grade glioma on FLAIR (T2/FLAIR hyperintensity,
signal abnormality, infiltrative tumour, hemispheric, crossing the midline). They were fixed
before any result on them was seen. They are used nowhere else: training never reads them, and
a template draw that equals a training text or a rewording training can produce is drawn
again (and the script stops when a row has no other). Several templates per kind (at least five), drawn per row with a fixed seed.

    python examples/report_wording_testset.py --data ../shared/data --out work/report-wording
    mriseg evaluate --model chest-xray --data work/report-wording/chest --split test
    mriseg evaluate --model brain-mri --data work/report-wording/brain --split test

The output holds one manifest folder per domain (test images and masks copied beside it).

``--control`` also writes ``<domain>-paraphrase/``: the same test rows in the wording of the
training paraphraser (``data/paraphrase.py``), drawn from the same ``target`` column as the
report wordings. Both sets then carry the same information (the target alone: a `describe`
row's training sentence also lists where the infected areas are, a brain row's its size), so
report wording against this control measures the wording alone, and the control against the
training sentences measures what the sentences' extra words are worth.

    python examples/report_wording_testset.py --data ../shared/data --out work/rw --control
    mriseg evaluate --model chest-xray --data work/rw/chest-paraphrase --split test
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from collections import Counter
from pathlib import Path

Z = {"upper": ["upper", "apical"], "middle": ["mid", "middle"], "lower": ["lower", "basal"]}
PLACES = {"upper": "apices", "middle": "mid zones", "lower": "bases"}
ABBR = {
    ("right", "upper"): "RUL",
    ("right", "middle"): "RML",
    ("right", "lower"): "RLL",
    ("left", "upper"): "LUL",
    ("left", "middle"): "lingula",
    ("left", "lower"): "LLL",
}
CHEST = {
    "infection_all": [
        "airspace opacities",
        "consolidation and ground-glass opacity",
        "pneumonic consolidation",
        "findings of COVID-19 pneumonia",
        "alveolar opacification",
        "parenchymal opacities in keeping with infection",
    ],
    "side": [
        "{s} lung airspace opacification",
        "consolidation throughout the {s} lung",
        "ground-glass opacity confined to the {s} hemithorax",
        "{s}-sided pneumonic change",
        "opacification throughout the {s} lung field",
    ],
    "both_sides": [
        "bilateral airspace opacification",
        "consolidation in both hemithoraces",
        "bilateral ground-glass opacities",
        "opacities in both lung fields",
        "bilateral pneumonic change",
    ],
    "zone": [
        "{s} {z} zone consolidation",
        "airspace opacity in the {s} {z} zone",
        "ground-glass opacification in the {abbr}",
        "{s} {z} zone ground glass",
        "opacity projected over the {s} {z} zone",
    ],
    "both_zone": [
        "bilateral {z} zone airspace opacities",
        "{z} zone ground glass bilaterally",
        "ground-glass opacity in both {z} zones",
        "consolidation at both {place}",
        "opacification of the {z} zones on both sides",
    ],
    "lung": [
        "{s} lung parenchyma",
        "the whole {s} hemithorax",
        "{s} lung field in full",
        "pulmonary parenchyma on the {s}",
        "the {s} lung and its borders",
    ],
    "lungs": [
        "the lung fields on both sides",
        "lung parenchyma bilaterally",
        "right and left hemithoraces",
        "both lungs in full",
        "all of the lung parenchyma",
    ],
    "heart": [
        "cardiomediastinal silhouette",
        "the cardiac contour",
        "cardiac contour on the frontal view",
        "outline of the cardiac silhouette",
        "heart border",
    ],
    "clavicle": [
        "{s} clavicle, whole bone",
        "the {s} collarbone",
        "{s} clavicular outline",
        "clavicle of the {s} side",
        "{s} collar bone in full",
    ],
    "nodule": [
        "{s} {z} zone pulmonary nodule",
        "nodule projected over the {s} {z} zone",
        "{s} {z} lobe nodular opacity",
        "solitary pulmonary nodule in the {abbr}",
        "{s} {z} zone mass",
    ],
    "nodule_side": [
        "pulmonary nodule projected over the {s} lung",
        "{s} lung nodular opacity",
        "solitary nodule in the {s} hemithorax",
        "{s} pulmonary mass",
        "nodule, {s} lung field",
    ],
}
BRAIN = {
    "side": [
        "{s} cerebral hemisphere glioma",
        "abnormal FLAIR signal in the {s} hemisphere",
        "{s}-sided tumour",
        "T2 hyperintense lesion, {s} side of the brain",
        "area of high FLAIR signal in the {s} hemisphere",
        "{s} hemispheric hyperintensity",
    ],
    "both": [
        "FLAIR abnormality crossing the midline",
        "bihemispheric glioma",
        "bilateral T2/FLAIR hyperintensity",
        "tumour extending across the midline",
        "signal abnormality in both cerebral hemispheres",
    ],
    "any": [
        "glioma",
        "tumour on this slice",
        "T2/FLAIR signal abnormality",
        "infiltrative tumour",
        "abnormal T2 signal",
    ],
}


def chest_wording(target: str, rng: random.Random) -> str | None:
    """A report wording of a chest ``target``; None for targets it lacks."""
    t = target.strip().lower()
    parts = t.split(":")
    c = CHEST
    if t == "none":  # a normal chest asked for a finding
        choice = [
            "infection:all",
            "infection:left",
            "infection:right",
            "infection:left+right:lower",
        ]
        return chest_wording(rng.choice(choice), rng)
    if parts[0] == "infection":
        if parts[1] == "all":
            return rng.choice(c["infection_all"])
        sides, zone = parts[1].split("+"), parts[2] if len(parts) > 2 else ""
        if len(sides) == 2:
            if not zone:
                return rng.choice(c["both_sides"])
            return rng.choice(c["both_zone"]).format(z=rng.choice(Z[zone]), place=PLACES[zone])
        s = sides[0]
        if not zone:
            return rng.choice(c["side"]).format(s=s)
        return rng.choice(c["zone"]).format(s=s, z=rng.choice(Z[zone]), abbr=ABBR[(s, zone)])
    if parts[0] == "lung" or t in ("left_lung", "right_lung"):
        side = parts[1] if parts[0] == "lung" else t.split("_")[0]
        return rng.choice(c["lungs"]) if side == "both" else rng.choice(c["lung"]).format(s=side)
    if t == "heart":
        return rng.choice(c["heart"])
    if t in ("left_clavicle", "right_clavicle"):
        return rng.choice(c["clavicle"]).format(s=t.split("_")[0])
    if parts[0] == "nodule" and len(parts) > 1:
        s, zone = parts[1], parts[2] if len(parts) > 2 and parts[2] in Z else ""
        if not zone:
            return rng.choice(c["nodule_side"]).format(s=s)
        return rng.choice(c["nodule"]).format(s=s, z=rng.choice(Z[zone]), abbr=ABBR[(s, zone)])
    return None


def brain_wording(target: str, text: str, rng: random.Random) -> str | None:
    """A report wording of a brain ``target`` (a 'none' row keeps the side its text names)."""
    from mrisegcli.data.paraphrase import side_of

    parts = target.strip().lower().split(":")
    side = side_of(text) if parts[0] == "none" else (parts[1] if len(parts) > 1 else "")
    if parts[0] not in ("none", "lesion"):
        return None
    if side == "both":
        return rng.choice(BRAIN["both"])
    if side:
        return rng.choice(BRAIN["side"]).format(s=side)
    return rng.choice(BRAIN["any"])


def training_wordings(rows: list[dict], draws: int = 400) -> set[str]:
    """Every training text and every rewording the training paraphraser produces for them
    (sampled until ``draws`` draws in a row bring nothing new), lower-cased."""
    from mrisegcli.data.paraphrase import paraphrase

    seen = {r["text"].strip().lower() for r in rows if r["split"] == "train"}
    for target, text in {(r["target"], r["text"]) for r in rows if r["split"] == "train"}:
        rng, misses = random.Random(f"{target}\0{text}"), 0
        while misses < draws:
            out = paraphrase(target, rng, text)
            if out is None:
                break
            key = out.strip().lower()
            misses = misses + 1 if key in seen else 0
            seen.add(key)
    return seen


DOMAINS = {"chest": ["cxr-infection", "jsrt"], "brain": ["lgg-flair"]}


def paraphraser_wording(target: str, text: str, rng: random.Random) -> str | None:
    """The training paraphraser's wording of ``target`` (the control set): a brain row keeps
    its side as its report wording does."""
    from mrisegcli.data.paraphrase import paraphrase

    return paraphrase(target, rng, text, kind="")


def row_wording(domain: str, row: dict, rng: random.Random, seen: set, control: bool) -> str:
    """The test ``row``'s new wording: a report wording that training never uses, or with
    ``control`` the training paraphraser's."""
    target = row["target"]
    if control:
        text = paraphraser_wording(target, row["text"], rng)
        if text is None:
            raise SystemExit(f"error: no paraphraser wording for target {target!r}")
        return text
    for _ in range(100):  # draw until the wording is not one training uses
        if domain == "brain":
            text = brain_wording(target, row["text"], rng)
        else:
            text = chest_wording(target, rng)
        if text is None or text.lower() not in seen:
            break
    if text is None or text.lower() in seen:
        raise SystemExit(f"error: no unseen report wording for target {target!r}")
    return text


def write_domain(data: Path, out: Path, domain: str, seed: int, control: bool = False) -> Counter:
    """The report-wording rows of ``domain`` into ``out`` (``control``: the paraphraser's
    wording instead, which training uses)."""
    rows_out, counts = [], Counter()
    for name in DOMAINS[domain]:
        src = data / name
        if not (src / "manifest.csv").is_file():
            continue
        with open(src / "manifest.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        seen = training_wordings(rows)
        rng = random.Random(f"{seed}-{name}")
        for r in rows:
            if r["split"] != "test":
                continue
            text = row_wording(domain, r, rng, seen, control)
            for col in ("image", "mask"):
                dst = out / name / r[col]
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    shutil.copyfile(src / r[col], dst)
            kind = r["kind"] if name != "jsrt" else f"jsrt {r['kind']}"
            rows_out.append(
                {
                    "image": f"{name}/{r['image']}",
                    "mask": f"{name}/{r['mask']}",
                    "text": text,
                    "split": "test",
                    "kind": kind,
                    "target": r["target"],
                }
            )
            counts[kind] += 1
    if rows_out:
        with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows_out[0]))
            w.writeheader()
            w.writerows(rows_out)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument(
        "--control",
        action="store_true",
        help="also write <domain>-paraphrase/: the rows in the training paraphraser's wording",
    )
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {args.out}: not empty (use --overwrite)")
    for domain in args.domains:
        for control in (False, True) if args.control else (False,):
            name = f"{domain}-paraphrase" if control else domain
            counts = write_domain(args.data, args.out / name, domain, args.seed, control)
            total = sum(counts.values())
            print(f"{name}: {total} test rows -> {args.out / name / 'manifest.csv'}")
            for kind, n in sorted(counts.items()):
                print(f"  {kind}: {n}")


if __name__ == "__main__":
    main()
