"""mriseg against a text-conditioned U-Net at the same wall-clock budget, on real data.

Each cell of the grid trains one model with a time budget (everything from reading the data to
the last validation counts), then scores the test split with ``mriseg evaluate``'s metrics:

* ``unet``: ``bench/baseline_unet.py`` (MONAI BasicUNet, text as bag-of-words channels);
* ``next-token`` / ``next-scale``: ``mriseg train --max-minutes M`` then ``mriseg evaluate``;
* ``defaults``: ``mriseg train --data D --out RUN --max-minutes M`` with no other option (what
  a user types), then ``mriseg evaluate``.

A method may name a variant after ``@`` (``next-token@refine``: the same run with the
settings of :data:`VARIANTS`), so that levers are measured as cells of their own.

One training at a time (two cores). Results are appended as JSON lines to ``--results``; a cell
already there is skipped, so the grid can be filled over several sittings (``--only`` picks
cells). Each row records the machine's load average before and after the cell: other work on
the machine slows every method and makes a cell take fewer steps. ``--table`` renders the
results as the markdown table of ``docs/benchmarks.md``.

    python bench/compare.py --data-root ../shared/data --work /tmp/compare        # the grid
    python bench/compare.py --only kvasir-seg:unet:15 --only kvasir-seg:next-token@refine:15
    python bench/compare.py --table                                               # print table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: idle-machine cells (compare_loaded.jsonl: an earlier sitting on a loaded machine)
RESULTS = HERE / "results" / "compare.jsonl"
#: the ``cxr`` preset's levers switched off: the preset as the first cells measured it
OLD = ["--mask-positions", "fed", "--no-mask-cell-image", "--scheduled-sampling", "0"]
#: the levers the ``cxr`` preset now has on
CELL_SS = ["--mask-positions", "target", "--mask-cell-image", "--scheduled-sampling", "0.5"]
#: extra ``mriseg train`` settings of a method variant (``next-token@refine``)
VARIANTS: dict[str, list[str]] = {
    "": [],  # the preset as it is (refiner, target-cell queries, scheduled sampling 0.5)
    "aug": ["--augment", "0.8"],
    "refine": ["--lambda-refine", "1", *OLD],  # the full-resolution refiner (models/refiner.py)
    # the refiner trained on codes of which half are replaced by random ones: it must check them
    "refine-robust": ["--lambda-refine", "1", *OLD, "--refine-code-noise", "0.5"],
    # and half of the teacher-forced inputs are the model's own predictions (exposure bias)
    "refine-ss": ["--lambda-refine", "1", *OLD, "--scheduled-sampling", "0.5"],
    # and 80% of the training samples randomly rotated, zoomed, shifted and re-contrasted
    "refine-aug": ["--lambda-refine", "1", *OLD, "--augment", "0.8"],
    # the query predicting a cell sits on it and carries its image token; scheduled sampling
    # (what the preset now does by itself), and the same with augmentation
    "refine-cell-ss": ["--lambda-refine", "1", *CELL_SS],
    "refine-cell-ss-aug": ["--lambda-refine", "1", *CELL_SS, "--augment", "0.8"],
    # and the refiner's last level at the input side, reading the pixels
    "aug-full": ["--augment", "0.8", "--refine-full-res"],
    # bf16 autocast on the CPU (native bf16 CPUs only): more steps in the same minutes
    "bf16": ["--cpu-bf16"],
    "bf16-aug": ["--augment", "0.8", "--cpu-bf16"],
    # and a residual block after each finer stage of the image encoder (the refiner's skips)
    "bf16-enc": ["--cpu-bf16", "--encoder-stage-blocks", "1"],
    "bf16-aug-enc": ["--augment", "0.8", "--cpu-bf16", "--encoder-stage-blocks", "1"],
    # bf16 with batches of 16 (the U-Net's): about twice the updates in the same minutes
    "bf16-aug-b16": ["--augment", "0.8", "--cpu-bf16", "--batch-size", "16"],
    # the presence probe trained with the model (losses/presence.py); with `defaults`: the
    # user's command and this one option
    "presence": ["--lambda-presence", "0.5"],
}
#: (dataset, method, minutes): the grid
GRID = [
    *[
        (d, m, b)
        for d in ("kvasir-seg", "cxr-infection", "jsrt")
        for b in (5, 15)
        for m in ("unet", "next-token")
    ],
    # the brain-MRI slices (issue: at an equal 15-minute budget, ahead of the U-Net + text)
    ("lgg-flair", "unet", 15),
    ("lgg-flair", "next-token", 15),
    # what a user gets who types only `mriseg train --data D --max-minutes 15`
    *[(d, "defaults", 15) for d in ("kvasir-seg", "cxr-infection", "jsrt", "lgg-flair")],
    # does training the presence probe with the model help the presence head?
    ("cxr-infection", "defaults@presence", 15),
    # the U-Net at the width its users run it (16-32-64-128-256, 1.9M parameters)
    *[(d, "unet@wide", 15) for d in ("kvasir-seg", "cxr-infection", "jsrt", "lgg-flair")],
    ("kvasir-seg", "unet@aug", 45),
    ("kvasir-seg", "next-token@aug", 45),
    *[(d, "next-scale", 15) for d in ("kvasir-seg", "cxr-infection", "jsrt")],
]


def cpu_name() -> str:
    """The CPU's model name and whether it computes bf16 natively (it sets the steps a cell
    makes in its minutes: rows from different CPUs are not a like-for-like pair)."""
    name, flags = "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value
    except OSError:
        pass
    bf16 = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    return f"{name} ({'native bf16' if bf16 else 'no native bf16'})"


def cell_key(dataset: str, method: str, minutes: float) -> str:
    return f"{dataset}:{method}:{minutes:g}"


def done_keys(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


#: extra ``baseline_unet.py`` settings of a U-Net variant (``unet@aug``)
UNET_VARIANTS: dict[str, list[str]] = {
    "": [],
    "aug": VARIANTS["aug"],
    "bf16": VARIANTS["bf16"],
    "bf16-aug": VARIANTS["bf16-aug"],
    # BasicUNet at 16-32-64-128-256 (1.9M parameters) instead of the script's 16-16-32-64-128
    "wide": ["--features", "16", "32", "64", "128", "256", "16"],
}


def run_unet(data: Path, method: str, minutes: float, size: int, threads: int) -> dict:
    variant = method.partition("@")[2]
    if variant not in UNET_VARIANTS:
        raise SystemExit(
            f"unknown variant {variant!r} in {method!r}; choose from {sorted(UNET_VARIANTS)}"
        )
    cmd = [
        sys.executable,
        str(HERE / "baseline_unet.py"),
        "--data",
        str(data),
        "--size",
        str(size),
        "--max-minutes",
        str(minutes),
        "--json",
        "--threads",
        str(threads),
        *UNET_VARIANTS[variant],
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "command": " ".join(cmd[1:])}


def run_mriseg(
    data: Path, method: str, minutes: float, preset: str, work: Path, threads: int
) -> dict:
    paradigm, _, variant = method.partition("@")
    if variant not in VARIANTS:
        raise SystemExit(
            f"unknown variant {variant!r} in {method!r}; choose from {sorted(VARIANTS)}"
        )
    run = work / f"{data.name}-{method.replace('@', '-')}-{minutes:g}"
    if run.exists():
        shutil.rmtree(run)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    train = ["mriseg", "train", "--data", str(data), "--out", str(run)]
    if paradigm == "defaults":  # the command a user types: nothing but the data and the time
        train += ["--max-minutes", str(minutes), *VARIANTS[variant]]
        preset = "(default)"
    else:
        train += ["--paradigm", paradigm, "--preset", preset, "--max-minutes", str(minutes)]
        train += ["--steps", "100000", "--device", "cpu", *VARIANTS[variant]]
    t0 = time.perf_counter()
    done = subprocess.run(train, capture_output=True, text=True, env=env)
    if done.returncode:  # the command's own last lines say why
        raise SystemExit(f"{' '.join(train)} failed:\n{done.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    ev = [
        "mriseg",
        "evaluate",
        "--model",
        str(run),
        "--data",
        str(data),
        "--json",
        "--device",
        "cpu",
    ]
    summary = json.loads(
        subprocess.run(ev, check=True, capture_output=True, text=True, env=env).stdout
    )
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "model": method,
        "data": [str(data)],
        "preset": preset,
        "max_minutes": minutes,
        "steps": metrics["steps"],
        "train_seconds": round(wall, 1),
        "best_val_dice": metrics["best_val_dice"],
        "dice": summary["dice"],
        "miou": summary["miou"],
        "n": summary["n"],
        "tokenizer_ceiling_dice": summary.get("tokenizer_ceiling_dice"),
        "threads": threads,
        "kinds": summary.get("kinds", {}),
        "parts": summary.get("parts", {}),
        **{
            k: summary["detection"][k]
            for k in ("dice_present", "drawn_on_empty", "found", "auroc")
            if k in summary.get("detection", {})
        },
        # the presence head's report on the val split (threshold chosen there), when it has one
        "presence_val": json.loads((run / "config.json").read_text())
        .get("presence", {})
        .get("report", {})
        .get("val"),
        "command": " ".join(train[1:]) + " && " + " ".join(ev[1:]),
    }


def table(path: Path) -> str:
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.is_file()
        else []
    )
    for r in rows:
        r.setdefault("method", r["model"])  # rows written before variants existed
    unets = ["unet", *sorted({r["method"] for r in rows if r["method"].startswith("unet@")})]
    methods = [*unets, *sorted({r["method"] for r in rows} - set(unets))]
    names = {"unet": "U-Net + text", "unet@aug": "U-Net + text, --augment 0.8"}

    def label(method: str) -> str:
        if method in names:
            return names[method]
        if method in unets:  # a U-Net variant: unet@bf16-aug
            return "U-Net + text @" + method.partition("@")[2]
        return "mriseg " + method

    lines = [
        "| data | budget | "
        + " | ".join(f"{label(m)} Dice" for m in methods)
        + " | mriseg lead | load |",
        "|---|---|" + "---|" * (len(methods) + 2),
    ]
    cells: dict[tuple[str, float], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["max_minutes"]), {})[r["method"]] = r

    def fmt(r: dict | None) -> str:
        if r is None:
            return "-"
        text = f"{r['dice']:.3f} ({r['steps']} steps)"
        if "dice_present" in r:  # the rows with a finding, and empty truths drawn on
            text += f"; present {r['dice_present']:.3f}"
            if "drawn_on_empty" in r:
                text += f", empty drawn {r['drawn_on_empty']:.0%}"
        if r.get("parts", {}).get("tokens"):
            text += f", tokens only {r['parts']['tokens']['dice']:.3f}"
        return text

    for (dataset, minutes), by in sorted(cells.items()):
        ours = [by[m]["dice"] for m in methods if m in by and m not in unets]
        theirs = [by[m]["dice"] for m in unets if m in by]
        lead = f"{max(ours) - max(theirs):+.3f}" if theirs and ours else "-"
        loads = [x for r in by.values() for x in r.get("load", [])]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        cols = " | ".join(fmt(by.get(m)) for m in methods)
        lines.append(f"| {dataset} | {minutes:g} min | {cols} | {lead} | {load} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mriseg-compare"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--only", action="append", help="dataset:method:minutes (repeatable)")
    ap.add_argument("--preset", default="cxr", help="mriseg preset (cxr: 128 px, 8x8 mask tokens)")
    ap.add_argument(
        "--size", type=int, default=128, help="U-Net input side (mriseg's preset sets its own)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the markdown table and exit")
    ap.add_argument(
        "--again",
        action="store_true",
        help="run the --only cells even when the results hold them (another machine's rows)",
    )
    args = ap.parse_args()
    if args.table:
        print(table(args.results))
        return
    todo = [c for c in GRID if cell_key(*c) not in done_keys(args.results)]
    if args.only:
        todo = [tuple(o.split(":")[:2]) + (float(o.split(":")[2]),) for o in args.only]
        if not args.again:
            todo = [c for c in todo if cell_key(*c) not in done_keys(args.results)]
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for dataset, method, minutes in todo:
        data = args.data_root / dataset
        print(f"> {cell_key(dataset, method, minutes)}", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[1]  # 5-minute average
        if method.partition("@")[0] == "unet":
            row = run_unet(data, method, minutes, args.size, args.threads)
        else:
            row = run_mriseg(data, method, minutes, args.preset, args.work, args.threads)
        row.update(
            key=cell_key(dataset, method, minutes),
            dataset=dataset,
            method=method,
            load=[round(load_before, 2), round(os.getloadavg()[1], 2)],
            machine=f"{os.cpu_count()}-core CPU",
            cpu=cpu_name(),
            date=time.strftime("%Y-%m-%d"),
        )
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  test Dice {row['dice']:.4f} ({row['steps']} steps)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
