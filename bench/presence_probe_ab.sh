#!/usr/bin/env bash
# Does the presence probe trained with the model (--lambda-presence) help the presence head?
# Two runs of the same fixed number of steps on cxr-infection, the same tokenizers and seed,
# one thread each, side by side (so that both see the same machine), then the test split:
#
#   A: the cxr preset with the probe off (--lambda-presence 0)
#   B: the same with --lambda-presence 0.5
#
# Each run fits its presence head as its last stage (threshold chosen on val); the presence
# report on val is in RUN/config.json ("presence"), the test detection in RUN-eval.json.
#
#   TOK=runs/cxr-tok OUT=/tmp/ab bash bench/presence_probe_ab.sh   # TOK: a run's tokenizers
#   STEPS=400                                                      # steps of each run
set -euo pipefail
DATA=${DATA:-../shared/data/cxr-infection}
OUT=${OUT:-/tmp/presence-ab}
STEPS=${STEPS:-400}
mkdir -p "$OUT"
if [[ -z "${TOK:-}" ]]; then  # fit the tokenizers once, shared by both runs
  TOK="$OUT/tok"
  mriseg tokenize --data "$DATA" --out "$TOK" --preset cxr --seed 0
fi
export OMP_NUM_THREADS=1
for arm in A B; do
  weight=0; [[ $arm == B ]] && weight=0.5
  cp -r "$TOK/cache" "$OUT/$arm-cache" 2>/dev/null || true
  mriseg train --data "$DATA" --out "$OUT/$arm" --tokenizer "$TOK" --cache "$OUT/$arm-cache" \
    --preset cxr --steps "$STEPS" --seed 0 --device cpu --lambda-presence "$weight" --overwrite \
    --json > "$OUT/$arm.json" 2> "$OUT/$arm.err" &
done
wait
for arm in A B; do
  mriseg evaluate --model "$OUT/$arm" --data "$DATA" --device cpu --json > "$OUT/$arm-eval.json" &
done
wait
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for arm in "AB":
    val = json.load(open(f"{out}/{arm}/config.json"))["presence"]["report"]["val"]
    ev = json.load(open(f"{out}/{arm}-eval.json"))
    det = ev["detection"]
    print(
        f"{arm}: val AUROC {val['auroc']:.3f} sensitivity {val['sensitivity']:.3f} | test Dice "
        f"{ev['dice']:.3f} AUROC {det['auroc']:.3f} found {det['found']:.3f} normals drawn "
        f"{det['drawn_on_empty']:.3f} Dice of present findings {det['dice_present']:.3f}"
    )
PY
