"""Cold start of one prediction: ``mriseg predict IMAGE --text "left lung"`` in a fresh process.

    python bench/bench_cold_start.py                 # 5 runs of each, torch's default threads
    python bench/bench_cold_start.py --n 7 --threads 2 --json
    git archive OLD src | tar -x -C /tmp/old         # an older commit's sources ...
    python bench/bench_cold_start.py --baseline /tmp/old/src   # ... timed in turns with these

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
  ``predict_batch``: planning the output, routing the input, reading, resizing and writing);
* **rest**: the whole command less the sum of the parts (parsing the arguments, printing, and
  the interpreter's exit, whose final garbage collection walks every object torch made).

The runs alternate (version, parts, command, version, ...; with ``--baseline``, each row of
the baseline right after the current one) so that a change of machine load hits every row.
Medians are reported (and the fastest and slowest run of the current sources). ``--threads
N`` sets ``OMP_NUM_THREADS`` (torch's thread count) in every child (0 leaves torch's default,
the number of cores). The children cache bytecode in
``--pycache`` (as an installed package has its ``.pyc`` files; one untimed run of each fills
it) even where ``PYTHONDONTWRITEBYTECODE`` is set; ``--no-pycache`` leaves that as it is.
Prints one table and one JSON line (``--json``: stdout holds only the JSON line).
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
from typing import Any

PARTS = ("import_torch", "import_predict_modules", "load", "decode", "read_route_write")
LABELS = {
    "version": "python start + mriseg --version",
    "import_torch": "import torch",
    "import_predict_modules": "import of the modules predict uses",
    "load": "model load",
    "decode": "decode (Segmenter.predict)",
    "read_route_write": "read, route, write",
    "sum_of_parts": "sum of the parts",
    "rest": "rest: arguments, printing, exit",
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


def child_env(args: argparse.Namespace, src: Path | None) -> dict[str, str]:
    """The environment of every child: threads, bytecode cache, and ``src`` first on the path."""
    env = dict(os.environ)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if args.pycache is not None:  # bytecode as an installed package has it
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(args.pycache)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    return env


class Variant:
    """One source tree timed: its environment and the runs of each row."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name, self.env = name, env
        self.runs: dict[str, list[float]] = {k: [] for k in ("version", *PARTS, "total")}
        self.torch_threads = 0

    def run_once(self, args: argparse.Namespace, image: Path, out: Path) -> None:
        mriseg = mriseg_command()
        seconds, _ = timed_run([*mriseg, "--version"], self.env)
        self.runs["version"].append(seconds)
        child = [sys.executable, "-c", CHILD, str(image), args.text, str(out / "parts")]
        _, stdout = timed_run(child, self.env)
        marks = json.loads(stdout.strip().splitlines()[-1])
        for part in PARTS:
            self.runs[part].append(marks[part])
        self.torch_threads = marks["torch_threads"]
        cmd = [*mriseg, "predict", str(image), "--text", args.text, "--out", str(out / "cmd")]
        seconds, _ = timed_run([*cmd, "--quiet"] if args.quiet else cmd, self.env)
        self.runs["total"].append(seconds)

    def medians(self) -> dict[str, float]:
        median = {k: 1000 * statistics.median(v) for k, v in self.runs.items()}
        median["sum_of_parts"] = sum(median[k] for k in ("version", *PARTS))
        median["rest"] = median["total"] - median["sum_of_parts"]
        return median


def measure(args: argparse.Namespace, image: Path, tmp: Path) -> list[Variant]:
    """Every variant ``--n`` times, in turns, after one untimed run of each (which also fills
    the bytecode cache)."""
    variants = [Variant("current", child_env(args, None))]
    if args.baseline is not None:
        variants.append(Variant("baseline", child_env(args, args.baseline)))
    for v in variants:
        Variant(v.name, v.env).run_once(args, image, tmp / f"warm-{v.name}")
    for i in range(args.n):
        for v in variants:
            v.run_once(args, image, tmp / f"{v.name}{i}")
        took = ", ".join(f"{v.name} {v.runs['total'][-1]:.2f} s" for v in variants)
        print(f"run {i + 1}/{args.n}: {took}", file=sys.stderr)
    return variants


ROWS = ("version", *PARTS, "sum_of_parts", "rest", "total")


def print_table(variants: list[Variant], show: Any) -> None:
    medians = [v.medians() for v in variants]
    head = f"{'part (median ms)':38s}" + "".join(f"{v.name:>10s}" for v in variants)
    ratio = "  base/cur" if len(variants) == 2 else ""
    print(head + ratio + f"  {'min-max':>13s}", file=show)
    for k in ROWS:
        line = f"{LABELS[k]:38s}" + "".join(f"{m[k]:10.0f}" for m in medians)
        if len(variants) == 2:
            line += f"  {medians[1][k] / medians[0][k]:7.2f}x" if medians[0][k] > 0 else " " * 10
        runs = variants[0].runs.get(k)
        if runs:
            line += f"  {1000 * min(runs):6.0f}-{1000 * max(runs):<6.0f}"
        print(line, file=show)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=5, help="fresh processes per measurement")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0: torch's default)")
    p.add_argument("--text", default="left lung")
    p.add_argument("--image", type=Path, help="the input (default: a synthetic radiograph)")
    p.add_argument("--quiet", action="store_true", help="run the command with --quiet")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="SRC",
        help="also time the mrisegcli of this source folder (e.g. an older commit's src/ from "
        "`git worktree add`), in turns with the installed one",
    )
    p.add_argument(
        "--pycache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mriseg-bench-pycache",
        help="bytecode cache of the children (PYTHONPYCACHEPREFIX), as an installed package has",
    )
    p.add_argument(
        "--no-pycache",
        dest="pycache",
        action="store_const",
        const=None,
        help="leave bytecode caching as the environment has it (PYTHONDONTWRITEBYTECODE)",
    )
    p.add_argument("--json", action="store_true", help="stdout holds only the JSON line")
    args = p.parse_args()
    show = sys.stderr if args.json else sys.stdout
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mriseg-cold-") as tmp:
        image = args.image or synthetic_radiograph(Path(tmp) / "chest.png")
        variants = measure(args, image, Path(tmp))
    print_table(variants, show)
    import torch  # only for its version, after every measurement

    record = {
        "bench": "cold_start",
        "n": args.n,
        "threads": args.threads,
        "torch_threads": variants[0].torch_threads,
        "bytecode_cache": args.pycache is not None,
        "text": args.text,
        "median_ms": {k: round(v, 1) for k, v in variants[0].medians().items()},
        "runs_ms": {k: [round(1000 * s, 1) for s in r] for k, r in variants[0].runs.items()},
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if args.baseline is not None:
        record["baseline"] = str(args.baseline)
        record["baseline_median_ms"] = {k: round(v, 1) for k, v in variants[1].medians().items()}
        record["baseline_runs_ms"] = {
            k: [round(1000 * s, 1) for s in r] for k, r in variants[1].runs.items()
        }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
