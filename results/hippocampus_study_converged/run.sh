#!/usr/bin/env bash
# The study at converged budgets on Task04_Hippocampus, on a GPU or, in chunks, on CPUs:
#   OMP_NUM_THREADS=1 NUM_WORKERS=0 JOBS=2 HOURS=2.5 bash results/hippocampus_study_converged/run.sh
#   (BY_ARM=1: one process per arm rather than per labeled count, for the last arms; see step 2)
# Rerun the whole script to resume: every finished pretraining, tuning run and arm is kept (its
# pretrain.json / result.json), an interrupted one continues from its last checkpoint, and each call
# stops after HOURS hours (default 1.8): no new run starts and a run in progress pauses at its next
# checkpoint (<= 500 steps), so the study runs in chunks of about two hours. Commit
# results/hippocampus_study_converged/ after each chunk (snapshot.sh copies the records there).
#
# The study runs the library as it was at its first chunk: that chunk copies the committed package
# into $OUT/code (its commit in $OUT/code/COMMIT) and every chunk imports it from there, so later work
# on the library never mixes versions within the study. To move the study to newer code on purpose,
# delete $OUT/code (and say so in the write-up). The report (step 3) reads only the runs' records,
# so it uses this checkout's library: a corrected report needs no new training.
set -euo pipefail
DATA=${DATA:-../shared/data/Task04_Hippocampus}
OUT=${OUT:-runs/hippocampus_study_converged}
REPORT=results/hippocampus_study_converged
HOURS=${HOURS:-1.8}
# Loader worker processes per run (unused where the cache is held in memory, as on the CPU).
NUM_WORKERS=${NUM_WORKERS:-2}
# Runs trained at once: independent tuning runs in stage 1 (--jobs), labeled counts in stage 2
# (6 = all side by side, for a GPU; one per core with OMP_NUM_THREADS=1 on a small CPU).
JOBS=${JOBS:-6}
# An external labeled folder to score every arm's selected model on as well (optional).
EXTRA=(${TEST_DATA:+--test-data "$TEST_DATA"})
SEEDS=5
COMMON=(--protocol converged --data "$DATA" --out "$OUT" --seeds "$SEEDS"
        --pretrain-steps 20000 --short-fraction 0.1 --flatten-tolerance 0.01
        --finetune-max-steps 8000 --val-every 100 --max-val-cases 10
        --plateau-patience 10 --plateau-min-delta 0.005 --plateau-min-steps 1000
        --encoder-stages 3 --mask-ratios 0.6,0.75 --tune-labeled 2 --tune-seed 100
        --tune-lrs 3e-4,1e-3,3e-3 --tune-warmups 100,1000 --tune-layer-decays 1.0,0.75
        --tune-freeze-steps 0,500 --tune-scratch-lrs 2e-4,5e-4,1e-3,2e-3,3e-3,5e-3,1e-2,2e-2,5e-2
        --tune-scratch-warmups 1000,100 --tune-scratch-weight-decays 0.01,0.05
        --precision fp32 --num-workers "$NUM_WORKERS" --max-hours "$HOURS" --no-progress "${EXTRA[@]}")
mkdir -p "$OUT"
CODE=$OUT/code
if [ ! -f "$CODE/COMMIT" ]; then
    if [ -n "$(git status --porcelain -- maeformer_fast)" ]; then
        echo "run.sh: maeformer_fast/ has uncommitted changes; commit them before the study copies the code" >&2
        exit 2
    fi
    mkdir -p "$CODE"
    git archive HEAD maeformer_fast | tar -x -C "$CODE"
    git rev-parse HEAD >"$CODE/COMMIT"
fi
CHECKOUT_PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$(cd "$CODE" && pwd)${PYTHONPATH:+:$PYTHONPATH} # `maeformer` imports the copy
# The command line of whichever library PYTHONPATH names first: an installed `maeformer` script names the
# checkout's entry point, which the frozen copy may not have (the layout moved on 2026-12-06), and
# PYTHONSAFEPATH keeps `python -m` from putting the checkout (the current folder) before the copy.
maeformer() { PYTHONSAFEPATH=1 python3 -m maeformer_fast.cli "$@"; }
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null ||
  echo "$(nproc --all) CPU cores, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
  echo "chunk of $(date -u +%FT%TZ): code $(cat "$CODE/COMMIT"), load average $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$OUT/machine.txt"

# 1. Pretext choice (mask ratio 0.6 vs 0.75 on the 3-stage encoder, short pretraining), the long and
#    short pretraining, counted FLOPs, MAE recipe and scratch-lr tuning: validation only, no arms yet.
#    It exits 75 where --max-hours stopped it: the choices are not final (a search extended after the
#    study had run, as the scratch search was, leaves the older choices.json in place until then).
STAGE1=0
maeformer study "${COMMON[@]}" --labeled 2 --seeds 0 --jobs "$JOBS" --report-dir "$OUT/report-tuning" \
    2>&1 | tee -a "$OUT/stage1.log" || STAGE1=$?
if [ "$STAGE1" != 0 ]; then
    echo "tuning not finished (exit $STAGE1; 75 = --max-hours): rerun this script" >&2
    exit "$STAGE1"
fi
[ -n "${TUNING_ONLY:-}" ] && exit 0 # TUNING_ONLY=1: stage 1 only (the scratch search, before its arms rerun)

# 2. The arms (mae, mae_short, scratch x 5 seeds), one process per labeled count, JOBS of them at a
#    time (all six side by side on one GPU); they share only the finished pretraining and tuning runs.
#    BY_ARM=1: one process per unfinished arm instead (`--only-arm SEED:ARM`), so that the last arms
#    of one labeled count train side by side rather than one after another. The frozen code must have
#    that option (commits after 2026-12-06; the chunks before used a script that patched the arm loop).
launch() { # launch LOG COMMAND...: in the background, JOBS at a time, within what is left of HOURS
    local log=$1
    shift
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n || true; done # a failed run must not orphan the rest
    # what is left of this call's HOURS (a later run gets no fresh budget of its own)
    left=$(python3 -c "print(round($HOURS - $SECONDS / 3600, 3))")
    if python3 -c "import sys; sys.exit(not $left > 0.05)"; then
        "$@" --max-hours "$left" >>"$log" 2>&1 &
    fi
}
for K in 1 2 4 8 16 all; do
    if [ -z "${BY_ARM:-}" ]; then
        launch "$OUT/arms-$K.log" maeformer study "${COMMON[@]}" --labeled "$K" --report-dir "$OUT/report-$K"
        continue
    fi
    for ((S = 0; S < SEEDS; S++)); do
        for ARM in mae mae_short scratch; do
            [ -f "$OUT/runs/labeled-$K/seed-$S/$ARM/result.json" ] && continue
            launch "$OUT/arms-$K-seed-$S-$ARM.log" maeformer study "${COMMON[@]}" --only-arm "$S:$ARM" \
                --labeled "$K" --report-dir "$OUT/report-$K-seed-$S-$ARM"
        done
    done
done
wait

# 3. Tables, effects, plots and report.md over every finished arm: into $REPORT once all 90 arms
#    (6 counts x 5 seeds x 3 arms) have finished, before that into $OUT/report-partial, so that a
#    chunk of a rerun (the scratch arms since 2026-12-07) leaves the committed report alone.
ARMS_DONE=$(compgen -G "$OUT/runs/labeled-*/seed-*/*/result.json" | wc -l || true)
REPORT_HERE=$REPORT
[ "$ARMS_DONE" -ge 90 ] || REPORT_HERE=$OUT/report-partial
if [ "$ARMS_DONE" -gt 0 ]; then
    PYTHONPATH=$CHECKOUT_PYTHONPATH maeformer study --data "$DATA" --out "$OUT" --report-only \
        --report-dir "$REPORT_HERE"
else
    echo "no arm has finished yet: no report" >&2
fi
cp "$OUT"/machine.txt "$OUT"/stage1.log "$OUT"/arms-*.log "$REPORT"/ 2>/dev/null || true
