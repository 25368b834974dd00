#!/usr/bin/env bash
# Evaluate the chest-radiograph run on the test splits (canonical texts, text removed) and on the
# unseen-wording test set, then copy it into the package with its metrics and model card.
#
#   bash examples/evaluate_cxr_model.sh               # RUN=runs/cxr-cal EVAL=work/cxr-eval DATA=../shared/data
#   DEST=work/cxr-eval/model                      # write the model and its card there instead of the package
set -euo pipefail
DATA=${DATA:-../shared/data}
RUN=${RUN:-runs/cxr-cal}
EVAL=${EVAL:-work/cxr-eval}
mkdir -p "$EVAL"
SECONDS=0
mriseg evaluate --model "$RUN" --data "$DATA/cxr-infection" --split test --text-ablation empty --image-ablation \
  --device cpu --json --csv "$EVAL/cxr_cases.csv" --overwrite > "$EVAL/cxr.json"
mriseg evaluate --model "$RUN" --data "$DATA/jsrt" --split test --text-ablation empty \
  --device cpu --json --csv "$EVAL/jsrt_cases.csv" --overwrite > "$EVAL/jsrt.json"
python examples/cxr_paraphrase_testset.py --data "$DATA" --out "$EVAL/unseen-wording" --overwrite
mriseg evaluate --model "$RUN" --data "$EVAL/unseen-wording" --split test --device cpu --json \
  > "$EVAL/paraphrase.json"
python examples/report_wording_testset.py --data "$DATA" --out "$EVAL/report-wording" --domains chest --overwrite --control
mriseg evaluate --model "$RUN" --data "$EVAL/report-wording/chest" --split test --device cpu --json \
  --csv "$EVAL/report_wording_cases.csv" --overwrite > "$EVAL/report_wording.json"
# which report wordings lose, prompt by prompt, and which of them predict would refuse
python examples/wording_by_template.py --canonical "$EVAL/cxr_cases.csv" --canonical "$EVAL/jsrt_cases.csv" \
  --reworded "$EVAL/report_wording_cases.csv" --json "$EVAL/report_wording_by_prompt.json"
# the control: the same rows in the training paraphraser's words (the same information)
mriseg evaluate --model "$RUN" --data "$EVAL/report-wording/chest-paraphrase" --split test --device cpu --json \
  > "$EVAL/paraphraser_wording.json"
echo "evaluation wall time: ${SECONDS} s"
python examples/ship_cxr_model.py --run "$RUN" --eval "$EVAL" ${DEST:+--dest "$DEST"}
