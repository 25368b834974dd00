#!/usr/bin/env bash
# Train the brain-MRI model that ships inside the package, from the shared real data: lgg-flair
# (axial FLAIR slices of 80 lower-grade glioma patients with the radiologist's FLAIR-abnormality
# mask; referring rows describe / side / contra / absent), train split only (64 patients), model
# selection on val (8 patients). Training ends by fitting the presence head (contra and absent
# rows are empty masks) and recording the model's scope.
#
#   bash examples/train_brain_model.sh                  # DATA=../shared/data RUN=runs/brain
#   MINUTES=90 STEPS=6000                               # the wall-clock budget (whole run) and step cap
#
# The shipped weights are this run fine-tuned with the presence probe and augmentation:
#   FROM=runs/brain MODEL=brain-mri bash examples/finetune_with_presence_probe.sh
#   python examples/ship_brain_model.py --run runs/brain-mri-probe --eval work/brain-mri-probe
# Measured wall time: see docs/brain_model.md (2-core CPU).
set -euo pipefail
DATA=${DATA:-../shared/data}
RUN=${RUN:-runs/brain}
EXTRA=()
if [[ "${RESUME:-0}" == 1 ]]; then EXTRA+=(--resume); fi
SECONDS=0
# the chest preset's architecture (128-px input, 8x8 mask tokens, refiner, scheduled sampling)
# with two brain rewordings of every training row (lesion targets; 'none' rows keep their side)
mriseg train --data "$DATA/lgg-flair" --out "$RUN" --preset cxr --seed 0 --nktp-k 4 --device cpu \
  --max-minutes "${MINUTES:-90}" --steps "${STEPS:-6000}" "${EXTRA[@]}"
echo "training wall time: ${SECONDS} s"
