#!/usr/bin/env bash
# One code version's arm of labeled 1, seed 0, in OUT=runs/repro_check/${PREFIX}out-VERSION (a copy of the finished
# study's tuning and pretraining records, the other arms of seed 0 marked finished with their old result.json).
# As it ran from runs/repro_check/ (its own folder W, holding code-VERSION from `git archive VERSION maeformer_fast`).
set -euo pipefail
v=$1; W=$(cd "$(dirname "$0")" && pwd)
cd /work/main
export PYTHONPATH=$W/code-$v OMP_NUM_THREADS=1
PYTHONSAFEPATH=1 /work/main/.venv/bin/python3 -m maeformer_fast.cli study --protocol converged --data ../shared/data/Task04_Hippocampus \
    --out "$W/${PREFIX:-}out-$v" --seeds 1 --labeled 1 \
    --pretrain-steps 20000 --short-fraction 0.1 --flatten-tolerance 0.01 \
    --finetune-max-steps 8000 --val-every 100 --max-val-cases 10 \
    --plateau-patience 10 --plateau-min-delta 0.005 --plateau-min-steps 1000 \
    --encoder-stages 3 --mask-ratios 0.6,0.75 --tune-labeled 2 --tune-seed 100 \
    --tune-lrs 3e-4,1e-3,3e-3 --tune-warmups 100,1000 --tune-layer-decays 1.0,0.75 \
    --tune-freeze-steps 0,500 --tune-scratch-lrs 2e-4,5e-4,1e-3,2e-3,3e-3,5e-3 \
    --precision fp32 --num-workers 0 --max-hours 1 --no-progress --report-dir "$W/${PREFIX:-}report-$v"
