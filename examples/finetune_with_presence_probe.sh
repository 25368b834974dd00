#!/usr/bin/env bash
# A shipped model fine-tuned with the presence probe (`mriseg train --init-from NAME
# --lambda-presence 0.5`), evaluated as the shipped one is, written beside the evaluation (not
# into the package), and its test numbers printed beside the shipped model's
# (docs/cxr_model.md, docs/brain_model.md).
#
#   bash examples/finetune_with_presence_probe.sh                  # MODEL=chest-xray
#   MODEL=brain-mri bash examples/finetune_with_presence_probe.sh  # with --augment 0.8, 1200 steps
#   DATA=../shared/data RUN=runs/MODEL-probe EVAL=work/MODEL-probe
#   LR=5e-4 STEPS=600 MINUTES=25 EVERY=100 SEED=0   # the chest defaults (brain: 1200 steps, 28 min)
#   FROM=runs/brain MODEL=brain-mri ...  # start from a run (the shipped brain-mri came from the
#                                        # run of examples/train_brain_model.sh this way)
# For brain-mri the fine-tuned run then gets its volume post-processing chosen on the val
# patients' volumes (`mriseg calibrate --scope-only --volumes`, written to RUN-volumes).
set -euo pipefail
MODEL=${MODEL:-chest-xray}
FROM=${FROM:-$MODEL}
DATA=${DATA:-../shared/data}
RUN=${RUN:-runs/$MODEL-probe}
EVAL=${EVAL:-work/$MODEL-probe}
case "$MODEL" in
  chest-xray) SETS=(--data "$DATA/cxr-infection" --data "$DATA/jsrt")
    MORE=(--steps "${STEPS:-600}" --max-minutes "${MINUTES:-25}")
    EVALUATE=examples/evaluate_cxr_model.sh ;;
  brain-mri) SETS=(--data "$DATA/lgg-flair")
    MORE=(--steps "${STEPS:-1200}" --augment 0.8 --max-minutes "${MINUTES:-28}")
    EVALUATE=examples/evaluate_brain_model.sh ;;
  *) echo "MODEL must be chest-xray or brain-mri" >&2; exit 2 ;;
esac
SECONDS=0
mriseg train "${SETS[@]}" --out "$RUN" --init-from "$FROM" --lambda-presence 0.5 --lr "${LR:-5e-4}" \
  --eval-every "${EVERY:-100}" --ckpt-every "${EVERY:-100}" --seed "${SEED:-0}" --device cpu "${MORE[@]}"
echo "training wall time: ${SECONDS} s"
if [[ "$MODEL" == brain-mri ]]; then
  # the volume post-processing chosen on the val patients' volumes (docs/commands.md, calibrate)
  python examples/brain_test_volumes.py --data "$DATA/lgg-flair" --out "$EVAL/val-volumes" --split val
  mriseg calibrate --model "$RUN" --data "$DATA/lgg-flair" --scope-only --volumes "$EVAL/val-volumes" \
    --out "$RUN-volumes" --device cpu --overwrite
  RUN="$RUN-volumes"
fi
RUN="$RUN" EVAL="$EVAL" DATA="$DATA" DEST="$EVAL/model" bash "$EVALUATE"
SHIPPED=$(python -c "from mrisegcli.shipped import SHIPPED_DIR; print(SHIPPED_DIR / '$MODEL')")
python examples/compare_shipped_evaluations.py "$SHIPPED/evaluation.json" "$EVAL/model/evaluation.json"
