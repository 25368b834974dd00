"""Cold start of one prediction: ``mriseg predict IMAGE --text "left lung"`` in a fresh process.

    python bench/bench_cold_start.py                 # 5 runs of each, torch's default threads
    python bench/bench_cold_start.py --n 7 --threads 2 --json

What a user feels when segmenting one radiograph with the shipped model: the whole command,
run ``--n`` times in fresh subprocesses (IMAGE: a synthetic 256 x 256 chest-like PNG written to
a temporary folder, so no dataset is needed; ``--image`` to use another), each writing its mask
to a fresh folder. Its parts are measured in fresh subprocesses too, the same number of times:

* **python start + mriseg --version**: the interpreter and the command-line module;
* in one child process that runs what ``mriseg predict`` runs, in order: **import torch**, the
  **import of the modules predict uses** (``workflow.predict``, ``workflow.commands``,
  ``shipped``), **model load** (``model_loader``: choosing, resolving and loading the model,
  including the imports it does inside), **decode** (``Segmenter.predict``: tokenising the
  prompt, the image encoder, the decoder, presence) and **read, route, write** (the rest of
  ``predict_batch``: planning the output, routing the input, reading, resizing and writing).

The runs alternate (version, parts, command, version, ...) so that a change of machine load
hits every row. Medians are reported; ``--threads N`` sets ``OMP_NUM_THREADS`` (torch's thread
count) in every child (0 leaves torch's default, the number of cores). Prints one table and
one JSON line (``--json``: stdout holds only the JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("import_torch", "import_predict_modules", "load", "decode", "read_route_write")
LABELS = {
    "version": "python start + mriseg --version",
    "import_torch": "import torch",
    "import_predict_modules": "import of the modules predict uses",
    "load": "model load",
    "decode": "decode (Segmenter.predict)",
    "read_route_write": "read, route, write",
    "sum_of_parts": "sum of the parts",
    "total": "mriseg predict (whole command)",
}

# Runs what `mriseg predict IMAGE --text TEXT --out OUT` runs, timing each part; prints JSON.
CHILD = """
import json, sys, time
T = time.perf_counter
image, text, out = sys.argv[1:4]
marks, t0 = {"decode": 0.0}, T()
import mrisegcli.cli
t1 = T()
import torch
marks["import_torch"] = T() - t1
t1 = T()
import mrisegcli.shipped, mrisegcli.workflow.commands, mrisegcli.workflow.predict
marks["import_predict_modules"] = T() - t1
from mrisegcli.shipped import route_input
from mrisegcli.workflow.commands import model_loader
from mrisegcli.workflow.predict import PredictOptions, predict_batch

class Timed:  # the loaded Segmenter, its predict timed
    def __init__(self, seg):
        self.seg = seg
    def __getattr__(self, name):
        return getattr(self.seg, name)
    def predict(self, *args, **kwargs):
        t = T()
        out = self.seg.predict(*args, **kwargs)
        marks["decode"] += T() - t
        return out

load = model_loader(None, "auto", announce=None, on_choice=lambda c: None, warn=lambda m: None)
def timed_load(route=None):
    t = T()
    seg = load(route)
    marks["load"] = T() - t
    return Timed(seg)

t1 = T()
predict_batch(timed_load, inputs=[image], text=text, options=PredictOptions(out_dir=out),
              route=route_input)
marks["read_route_write"] = T() - t1 - marks["load"] - marks["decode"]
marks["child_total"] = T() - t0
marks["torch_threads"] = torch.get_num_threads()
print(json.dumps(marks))
"""


def synthetic_radiograph(path: Path, size: int = 256) -> Path:
    """A chest-like grey PNG: a bright body, two darker lung fields, a mediastinum, noise."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((yy - 0.55) / 0.48) ** 2 + ((xx - 0.5) / 0.45) ** 2 < 1
    lungs = [((yy - 0.45) / 0.3) ** 2 + ((xx - c) / 0.15) ** 2 < 1 for c in (0.3, 0.7)]
    img = 60 + 120 * body - 80 * (lungs[0] | lungs[1])
    img = img + np.random.default_rng(0).normal(0, 6, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def mriseg_command() -> list[str]:
    """The ``mriseg`` script beside this interpreter, else ``python -m mrisegcli``."""
    script = Path(sys.executable).parent / "mriseg"
    if script.is_file():
        return [str(script)]
    found = shutil.which("mriseg")
    return [found] if found else [sys.executable, "-m", "mrisegcli"]


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one subprocess and its stdout; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")
    return seconds, proc.stdout


def measure(args: argparse.Namespace, image: Path, tmp: Path) -> dict[str, list[float]]:
    env = dict(os.environ)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    mriseg = mriseg_command()
    runs: dict[str, list[float]] = {k: [] for k in ("version", *PARTS, "total")}
    threads = []
    for i in range(args.n):
        seconds, _ = timed_run([*mriseg, "--version"], env)
        runs["version"].append(seconds)
        out = tmp / f"parts{i}"
        _, stdout = timed_run([sys.executable, "-c", CHILD, str(image), args.text, str(out)], env)
        marks = json.loads(stdout.strip().splitlines()[-1])
        for part in PARTS:
            runs[part].append(marks[part])
        threads.append(marks["torch_threads"])
        cmd = [*mriseg, "predict", str(image), "--text", args.text, "--out", str(tmp / f"o{i}")]
        seconds, _ = timed_run([*cmd, "--quiet"] if args.quiet else cmd, env)
        runs["total"].append(seconds)
        print(f"run {i + 1}/{args.n}: {seconds:.2f} s", file=sys.stderr)
    runs["torch_threads"] = threads
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=5, help="fresh processes per measurement")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0: torch's default)")
    p.add_argument("--text", default="left lung")
    p.add_argument("--image", type=Path, help="the input (default: a synthetic radiograph)")
    p.add_argument("--quiet", action="store_true", help="run the command with --quiet")
    p.add_argument("--json", action="store_true", help="stdout holds only the JSON line")
    args = p.parse_args()
    show = sys.stderr if args.json else sys.stdout
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mriseg-cold-") as tmp:
        image = args.image or synthetic_radiograph(Path(tmp) / "chest.png")
        runs = measure(args, image, Path(tmp))
    median = {k: 1000 * statistics.median(v) for k, v in runs.items() if k != "torch_threads"}
    median["sum_of_parts"] = sum(median[k] for k in ("version", *PARTS))
    rows = ("version", *PARTS, "sum_of_parts", "total")
    print(f"{'part':38s} {'median ms':>10s} {'min':>7s} {'max':>7s}", file=show)
    for k in rows:
        lo, hi = (
            (f"{1000 * min(runs[k]):7.0f}", f"{1000 * max(runs[k]):7.0f}")
            if k in runs
            else ("", "")
        )
        print(f"{LABELS[k]:38s} {median[k]:10.0f} {lo:>7s} {hi:>7s}", file=show)
    import torch  # only for its version, after every measurement

    record = {
        "bench": "cold_start",
        "n": args.n,
        "threads": args.threads,
        "torch_threads": runs["torch_threads"][0],
        "text": args.text,
        "median_ms": {k: round(median[k], 1) for k in rows},
        "runs_ms": {k: [round(1000 * s, 1) for s in v] for k, v in runs.items() if k in rows},
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
