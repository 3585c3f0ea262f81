#!/usr/bin/env bash
# Copies the small records of a study still in progress (run.sh's work folder) into records/, to commit
# between chunks: pretraining logs, records, last previews and encoders, tuning-run logs and results,
# finished arms' results, the machine and the study's settings, and writes progress.md (maeformer study
# --report-only). Fine-tuning weights and checkpoints stay in the work folder.
set -euo pipefail
OUT=${OUT:-runs/hippocampus_study_converged}
DEST=${DEST:-results/hippocampus_study_converged/records}
mkdir -p "$DEST"
cp "$OUT"/machine.txt "$OUT"/study_config.json "$OUT"/tuning.json "$OUT"/choices.json "$OUT"/flops.json \
    "$DEST"/ 2>/dev/null || true
for run in "$OUT"/pretrain/*/ "$OUT"/tuning/*/ "$OUT"/runs/labeled-*/seed-*/*/; do
    [ -d "$run" ] || continue
    name=${run#"$OUT"/}
    mkdir -p "$DEST/$name"
    # a pretraining's encoder too (3.4 MB): restore.sh starts a lost work folder from it
    cp "$run"/*.json "$run"/*.csv "$run"/encoder.safetensors "$DEST/$name" 2>/dev/null || true
    last_preview=$(ls "$run"/previews/*.png 2>/dev/null | tail -1 || true)
    if [ -n "$last_preview" ]; then cp "$last_preview" "$DEST/$name"; fi
done
# Runs set aside when the protocol changed (their records only; see records/README.md).
if [ -d "$OUT/superseded" ]; then
    (cd "$OUT" && find superseded -not -path '*/checkpoints/*' \( -name '*.json' -o -name '*.csv' \) -print) | while read -r file; do
        mkdir -p "$DEST/$(dirname "$file")"
        cp "$OUT/$file" "$DEST/$file"
    done
fi
# progress.md with the tuning and pretraining plots (the report over the finished arms is run.sh's step 3).
report=$(mktemp -d)
maeformer study --data "${DATA:-../shared/data/Task04_Hippocampus}" --out "$OUT" --report-only --report-dir "$report"
cp "$report"/progress.md "$report"/tuning_val_dice.png "$report"/pretrain_loss.png "$DEST"/
rm -r "$report"
echo "copied the study's records from $OUT to $DEST"
