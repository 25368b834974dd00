#!/usr/bin/env bash
# The declared dependency floors, tested: a fresh venv (outside the source tree) with CPU torch,
# then the package with every dependency pinned at its floor (.ci/constraints-min.txt), then the
# tests that touch those libraries (Hub client, tokenizers/transformers, DICOM/NIfTI/image I/O,
# spreadsheets, the CLI, MONAI as the metrics' reference).
#
#   bash .ci/min_versions.sh
#
# PYTHON picks the interpreter (default python3); KEEP=1 keeps the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d "${TMPDIR:-/tmp}/mrisegcli-min.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$venv"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q torch==2.13.0
python -m pip install -q -c .ci/constraints-min.txt -e ".[dev]"
# Every pin took effect (and a failure below names the versions it ran on).
python - <<'PY'
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

lines = [line.split("#")[0].strip() for line in open(".ci/constraints-min.txt")]
pins = {canonicalize_name(n): v for n, v in (line.split("==") for line in lines if line)}
# each pin is the ">=" floor of pyproject.toml, and each dependency has a pin
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = [Requirement(r) for r in project["dependencies"]]
reqs += [Requirement(r) for name, extra in project["optional-dependencies"].items() if name != "bench"
         for r in extra]  # bench: benchmark-only tools, installed at their newest in CI
for req in reqs:
    name = canonicalize_name(req.name)
    if name == canonicalize_name(project["name"]):
        continue
    if name == "torch":  # tested at the CPU build CI installs, not at its floor
        continue
    floors = [s.version for s in req.specifier if s.operator == ">="]
    assert name in pins, f"{req.name} has no pin in .ci/constraints-min.txt"
    assert floors and Version(floors[0]) == Version(pins[name]), f"{req} but pinned {pins[name]}"
got = {name: metadata.version(name) for name in pins}
print("minimum versions:", " ".join(f"{n}=={v}" for n, v in got.items()))
wrong = [f"{n} {got[n]} (pinned {v})" for n, v in pins.items() if Version(Version(got[n]).public) != Version(v)]
assert not wrong, f"not at the floor: {wrong}"
PY
python -m pytest -q -p no:cacheprovider \
  tests/test_hub_and_runinfo.py tests/test_push.py tests/test_text_tokenizer.py \
  tests/test_io_read.py tests/test_io_write.py tests/test_data_layouts.py tests/test_atomic_and_cli.py \
  tests/test_volume_metrics.py tests/test_metrics_vs_monai.py tests/test_nnunet_layout.py
