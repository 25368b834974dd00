#!/usr/bin/env bash
# Train the chest-radiograph model that ships inside the package, from the shared real data:
# cxr-infection (COVID-QU-Ex infection subset, QaTa-style referring rows, normal chests asked for
# an absent finding) + jsrt (JSRT radiographs with SCR organ masks and nodules), train splits
# only, model selection on val. Then evaluate on test, per kind, with canonical and unseen
# wordings, and copy the run into the package.
#
#   bash examples/train_cxr_model.sh                 # DATA=../shared/data RUN=runs/cxr
#   RESUME=1 bash examples/train_cxr_model.sh        # continue a stopped run
#   MINUTES=105 STEPS=6000                           # the wall-clock budget (whole run) and step cap
#   SHIPPED=0 bash examples/train_cxr_model.sh       # the cxr preset as it is now (see below)
#
# The shipped model was trained before the cxr preset gained the refiner, target-cell mask
# queries and scheduled sampling (docs/benchmarks.md); SHIPPED=1 (the default) switches them
# off so that this script reproduces it. SHIPPED=0 trains with the preset's current settings.
#
# Measured wall time: see docs/cxr_model.md (2-core CPU).
set -euo pipefail
DATA=${DATA:-../shared/data}
RUN=${RUN:-runs/cxr}
EXTRA=()
if [[ "${RESUME:-0}" == 1 ]]; then EXTRA+=(--resume); fi
if [[ "${SHIPPED:-1}" == 1 ]]; then
  EXTRA+=(--lambda-refine 0 --mask-positions fed --no-mask-cell-image --scheduled-sampling 0)
fi
SECONDS=0
mriseg train --data "$DATA/cxr-infection" --data "$DATA/jsrt" --out "$RUN" --preset cxr --seed 0 \
  --device cpu --max-minutes "${MINUTES:-105}" --steps "${STEPS:-6000}" "${EXTRA[@]}"
echo "training wall time: ${SECONDS} s"
