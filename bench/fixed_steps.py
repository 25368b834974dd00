"""Levers at a fixed number of steps: variants of ``mriseg train`` from the same tokenizers and
code cache, each scored by ``mriseg evaluate`` on the test split.

A time budget mixes two effects (a lever can help each step and cost time per step);
``compare.py`` measures the sum. This script isolates the first: every variant trains the same
number of steps with the same schedule, tokenizers and cached codes, so the only difference is
the lever. Wall time is recorded but depends on the machine's load.

    python bench/fixed_steps.py --data ../shared/data/cxr-infection \\
        --reference RUN --steps 500 \\
        --variant base= --variant target="--mask-positions target"

``--reference`` is a finished run whose tokenizers and code cache are reused (``mriseg train
--tokenizer REF --cache REF/cache``); every variant also gets ``--base-options`` (default: the
``cxr`` preset with the refiner and the levers measured here switched off, as it was before
them; a variant's own options come after and override them). One JSON line per variant goes to
``bench/results/fixed_steps.jsonl``: test Dice, the token-only / refined / dense parts and
the Dice per kind of row.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fixed_steps.jsonl"


def run_variant(name: str, extra: list[str], args: argparse.Namespace, env: dict[str, str]) -> dict:
    run = args.work / name
    ref = args.reference
    mriseg = [sys.executable, "-m", "mrisegcli"]
    train = [
        *mriseg,
        "train",
        "--data",
        str(args.data),
        "--out",
        str(run),
        *shlex.split(args.base_options),
        "--tokenizer",
        str(ref),
        "--cache",
        str(ref / "cache"),
        "--steps",
        str(args.steps),
        "--eval-every",
        str(args.eval_every),
        "--seed",
        str(args.seed),
        "--device",
        "cpu",
        "-q",
        "--overwrite",
        *extra,
    ]
    ev = [*mriseg, "evaluate", "--model", str(run), "--data", str(args.data), "--json"]
    ev += ["--device", "cpu", "-q"]
    t0 = time.perf_counter()
    subprocess.run(train, check=True, env=env)
    seconds = time.perf_counter() - t0
    summary = json.loads(
        subprocess.run(ev, check=True, capture_output=True, text=True, env=env).stdout
    )
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    return {
        "variant": name,
        "options": extra,
        "data": str(args.data),
        "steps": args.steps,
        "val_curve": [[r["step"], r["dice"]] for r in log if r.get("split") == "val"],
        "dice": summary["dice"],
        "miou": summary["miou"],
        "n": summary["n"],
        "parts": {k: v["dice"] for k, v in summary.get("parts", {}).items()},
        "kinds": {k: v["dice"] for k, v in summary.get("kinds", {}).items()},
        "train_seconds": round(seconds, 1),
        "load": round(os.getloadavg()[1], 2),
        "command": "mriseg " + " ".join(train[3:]) + " && mriseg " + " ".join(ev[3:]),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--reference", type=Path, required=True, help="run folder: tokenizers + cache")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--base-options",
        default="--preset cxr --lambda-refine 1 --mask-positions fed --no-mask-cell-image "
        "--scheduled-sampling 0",
        help="train options of every variant (default: the cxr preset as it was before "
        "target-cell queries and scheduled sampling)",
    )
    ap.add_argument(
        "--variant", action="append", required=True, help='NAME="extra train options" (repeatable)'
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/mriseg-fixed-steps"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.variant:
        name, _, options = spec.partition("=")
        row = run_variant(name, shlex.split(options), args, env)
        rows.append(row)
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        parts = ", ".join(f"{k} {v:.3f}" for k, v in row["parts"].items())
        print(f"{name}: test Dice {row['dice']:.4f} ({parts})", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
