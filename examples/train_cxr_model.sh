#!/usr/bin/env bash
# Train the chest-radiograph model that ships inside the package, from the shared real data:
# cxr-infection (COVID-QU-Ex infection subset, QaTa-style referring rows, normal chests asked for
# an absent finding) + jsrt (JSRT radiographs with SCR organ masks and nodules), train splits
# only, model selection on val. Then evaluate on test, per kind, with canonical and unseen
# wordings, and copy the run into the package.
#
# Three steps: training (RUN), its drafting heads refitted to the model's own greedy codes
# (RUN-fast: the same masks, fewer decoding passes), then its presence head and scope
# (RUN-cal), which examples/evaluate_cxr_model.sh evaluates and ships.
#
#   bash examples/train_cxr_model.sh                 # DATA=../shared/data RUN=runs/cxr
#   RESUME=1 bash examples/train_cxr_model.sh        # continue a stopped run
#   MINUTES=60 STEPS=6000                            # the wall-clock budget (whole run) and step cap
#
# Measured wall time: see docs/cxr_model.md (2-core CPU).
set -euo pipefail
DATA=${DATA:-../shared/data}
RUN=${RUN:-runs/cxr}
EXTRA=()
if [[ "${RESUME:-0}" == 1 ]]; then EXTRA+=(--resume); fi
SECONDS=0
# --cpu-bf16: bf16 autocast where the CPU computes bf16 natively (AVX512-BF16/AMX); elsewhere
# it warns once and trains in float32 (slower: expect fewer steps in the same minutes).
# --nktp-k 4: three drafting heads for self-speculative decoding (the preset has two)
mriseg train --data "$DATA/cxr-infection" --data "$DATA/jsrt" --out "$RUN" --preset cxr --seed 0 \
  --cpu-bf16 --nktp-k 4 --device cpu --max-minutes "${MINUTES:-60}" --steps "${STEPS:-6000}" "${EXTRA[@]}"
echo "training wall time: ${SECONDS} s"
# six codes per verifying pass instead of four: the heads are fitted on the train splits, selected
# on val, and the greedy codes are checked unchanged before the folder is written
mriseg draft-heads --model "$RUN" --data "$DATA/cxr-infection" --data "$DATA/jsrt" \
  --out "$RUN-fast" --heads 6 --device cpu --overwrite
# the presence head and scope of the fast model (training records them too; this refits them on
# the drafting model, with today's synonym rules where they read every training text the same)
mriseg calibrate --model "$RUN-fast" --data "$DATA/cxr-infection" --data "$DATA/jsrt" \
  --out "$RUN-cal" --max-cases 12000 --device cpu --overwrite
echo "total wall time: ${SECONDS} s"
