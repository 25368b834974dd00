#!/usr/bin/env bash
# Smoke test of a built wheel as a user of `pip install mrisegcli` gets it: a fresh venv outside
# the source tree (CPU torch first), then from a temporary directory there the main commands on
# a tiny synthetic dataset: synth, train, predict, evaluate.
#
#   bash .ci/wheel_smoke.sh dist/mrisegcli-*.whl
#
# PYTHON picks the interpreter (default python3); KEEP=1 keeps the temporary directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd -P)"
wheel="$(cd "$(dirname "${1:?usage: wheel_smoke.sh WHEEL}")" && pwd -P)/$(basename "$1")"
[ -f "$wheel" ] || { echo "wheel_smoke: no such wheel: $1" >&2; exit 2; }
work="$(mktemp -d "${TMPDIR:-/tmp}/mrisegcli-wheel.XXXXXX")"
work="$(cd "$work" && pwd -P)"
case "$work/" in "$root"/*) echo "wheel_smoke: $work lies inside the source tree" >&2; exit 2 ;; esac
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
echo "wheel_smoke: $(basename "$wheel") in $work"

"${PYTHON:-python3}" -m venv "$work/venv"
. "$work/venv/bin/activate"
# The CPU build of torch first, so no CUDA build is pulled in by the wheel's plain requirement.
python -m pip install -q torch==2.13.0
python -m pip install -q "$wheel"

cd "$work"
export HF_HUB_OFFLINE=1  # nothing here may need the network
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# The package is the installed wheel (not the source tree), with its licence and every shipped file.
python - "$root" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

import mrisegcli

root = Path(sys.argv[1])
pkg = Path(mrisegcli.__file__).resolve().parent
assert root not in pkg.parents, f"imported from the source tree: {pkg}"
dist = metadata.distribution("mrisegcli")
assert dist.version == mrisegcli.__version__, (dist.version, mrisegcli.__version__)
expression = "Apache-2.0 AND CC-BY-SA-4.0 AND LicenseRef-mriseg-research-data"
assert dist.metadata["License-Expression"] == expression, dist.metadata["License-Expression"]
names = {Path(str(f)).name for f in dist.files or []}
assert {"LICENSE", "MODEL_LICENSES.md"} <= names, "a licence file is missing from the wheel"


def files(base):
    return {p.relative_to(base).as_posix() for p in base.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            and not p.name.startswith(".")}


src, installed = files(root / "src/mrisegcli/shipped"), files(pkg / "shipped")
missing = sorted(src - installed)
assert not missing, f"shipped files missing from the wheel: {missing}"
print(f"installed {dist.metadata['Name']} {dist.version} from the wheel at {pkg}; "
      f"{len(installed)} files under shipped/")
EOF

mriseg --version
mriseg synth D --n-train 40 --n-val 8 --n-test 8 --size 64
mriseg train --data D --out R --preset tiny --size 64 --steps 4 --mask-steps 20 --eval-every 2 --device cpu
image="$(find D -path '*/Test_Folder/img/*' -type f | sort | head -n 1)"
[ -n "$image" ] || { echo "wheel_smoke: synth wrote no test image" >&2; exit 1; }
mriseg predict "$image" --text "Unilateral pulmonary infection, one infected area, middle right lung." \
  --model R --out P --device cpu
[ -n "$(find P -type f | head -n 1)" ] || { echo "wheel_smoke: predict wrote nothing" >&2; exit 1; }
mriseg evaluate --model R --data D --json --device cpu > evaluation.json
python -c 'import json; rows = [json.loads(s) for s in open("evaluation.json") if s.strip()]; assert rows and all(rows), rows'
echo "wheel_smoke: ok ($(find P -type f | wc -l | tr -d ' ') file(s) from predict, evaluation $(wc -c < evaluation.json | tr -d ' ') bytes of JSON)"
