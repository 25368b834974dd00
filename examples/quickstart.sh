#!/usr/bin/env bash
# The quickstart on the built-in data, on CPU: synthesise a referring dataset, train a small
# next-token model from raw data (mask tokenizer, code cache, transformer), evaluate it on the
# test split beside the tokenizer ceiling and with the text removed, then segment one case.
set -euo pipefail
WORK=${WORK:-work}
PRESET=${PRESET:-cpu}
PARADIGM=${PARADIGM:-next-token}
mriseg synth "$WORK/data" --n-train 4000 --n-val 200 --n-test 200 --seed 0 --overwrite
mriseg train --data "$WORK/data" --out "$WORK/run" --preset "$PRESET" --paradigm "$PARADIGM" \
  --device "${DEVICE:-auto}" --seed 0 --overwrite
mriseg evaluate --model "$WORK/run" --data "$WORK/data" --split test --text-ablation empty \
  --text-ablation shuffle --csv "$WORK/test_cases.csv" --overwrite
CASE=$(ls "$WORK/data/Test_Folder/img" | head -n 1)
TEXT=$(python -c "import pandas as p,sys; t=p.read_excel(sys.argv[1]); print(t[t.Image=='mask_'+sys.argv[2]].Description.iloc[0])" \
  "$WORK/data/Test_Folder/Test_text.xlsx" "$CASE")
mriseg predict "$WORK/data/Test_Folder/img/$CASE" --text "$TEXT" --model "$WORK/run" \
  --out "$WORK/pred" --overlay --overwrite
