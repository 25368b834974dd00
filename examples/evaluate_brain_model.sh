#!/usr/bin/env bash
# Evaluate the brain-MRI run on the lgg-flair test patients (slices with canonical texts and with
# the text removed, the test volumes, the slices asked in report words), then copy it into the
# package with its metrics and model card.
#
#   bash examples/evaluate_brain_model.sh           # RUN=runs/brain EVAL=work/brain-eval DATA=../shared/data
#   DEST=work/brain-eval/model                    # write the model and its card there instead of the package
set -euo pipefail
DATA=${DATA:-../shared/data}
RUN=${RUN:-runs/brain}
EVAL=${EVAL:-work/brain-eval}
mkdir -p "$EVAL"
SECONDS=0
mriseg evaluate --model "$RUN" --data "$DATA/lgg-flair" --split test --text-ablation empty \
  --device cpu --json --csv "$EVAL/slices.csv" --overwrite > "$EVAL/slices.json"
python examples/brain_test_volumes.py --data "$DATA/lgg-flair" --out "$EVAL/volumes"
mriseg evaluate --model "$RUN" --data "$EVAL/volumes" --split test --device cpu --json \
  --csv "$EVAL/volumes.csv" --overwrite > "$EVAL/volumes.json"
python examples/report_wording_testset.py --data "$DATA" --out "$EVAL/report-wording" --domains brain --overwrite --control
mriseg evaluate --model "$RUN" --data "$EVAL/report-wording/brain" --split test --device cpu --json \
  --csv "$EVAL/report_wording_cases.csv" --overwrite > "$EVAL/report_wording.json"
# which report wordings lose, prompt by prompt, and which of them predict would refuse
python examples/wording_by_template.py --canonical "$EVAL/slices.csv" \
  --reworded "$EVAL/report_wording_cases.csv" --json "$EVAL/report_wording_by_prompt.json"
# the control: the same rows in the training paraphraser's words (the same information)
mriseg evaluate --model "$RUN" --data "$EVAL/report-wording/brain-paraphrase" --split test --device cpu --json \
  > "$EVAL/paraphraser_wording.json"
echo "evaluation wall time: ${SECONDS} s"
python examples/ship_brain_model.py --run "$RUN" --eval "$EVAL" ${DEST:+--dest "$DEST"}
