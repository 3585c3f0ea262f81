#!/usr/bin/env bash
# Rebuilds run.sh's work folder from the committed records where it was lost (a fresh checkout), so
# that run.sh resumes where the records end:
#   OMP_NUM_THREADS=1 bash results/hippocampus_study_converged/restore.sh
# 1. The frozen code: the library at the commit the study runs on (the last chunk's line in
#    records/machine.txt) into $OUT/code, as run.sh's first chunk made it.
# 2. The records of every finished tuning run and arm (their result.json: run.sh skips them), the
#    tuning record, the choices and the counted FLOPs.
# 3. The pretrainings: their committed encoders where snapshot.sh saved them (records/pretrain/*/);
#    otherwise each is rerun with the frozen code (the long one beside the two short ones, one process
#    per core) and checked against its committed loss log: the rerun must log the same loss at every
#    logged step, or the script stops with the difference, since the arms still to run must start
#    from the encoders the finished ones started from. The committed record and log stay the study's
#    (their wall time is the pretraining the first arms waited for); a rerun's own are kept beside
#    them as pretrain_rerun.json, pretrain_rerun_log.csv and pretrain_rerun_config.json.
# An arm that was paused at a checkpoint starts again from step 0 (checkpoints are not committed).
set -euo pipefail
DATA=${DATA:-../shared/data/Task04_Hippocampus}
OUT=${OUT:-runs/hippocampus_study_converged}
RECORDS=results/hippocampus_study_converged/records
HERE=results/hippocampus_study_converged
# Steps 1 and 2 only where the work folder has no study yet; rerunning resumes step 3.
if [ ! -e "$OUT/choices.json" ]; then
    COMMIT=$(grep -o 'code [0-9a-f]\{40\}' "$RECORDS/machine.txt" | tail -1 | cut -d' ' -f2)
    mkdir -p "$OUT/code"
    git archive "$COMMIT" maeformer_fast | tar -x -C "$OUT/code"
    echo "$COMMIT" >"$OUT/code/COMMIT"

    cp "$RECORDS"/machine.txt "$RECORDS"/study_config.json "$RECORDS"/tuning.json "$RECORDS"/choices.json \
        "$RECORDS"/flops.json "$OUT"/
    cp "$HERE"/stage1.log "$HERE"/arms-*.log "$OUT"/
    cp -r "$RECORDS"/tuning "$RECORDS"/superseded "$OUT"/
    # The committed runs (folders under $RECORDS) that hold the file $1, into the same place in $OUT.
    copy_holding() {
        local file=$1 run
        shift
        for run in "$@"; do
            if [ -f "$run/$file" ]; then
                mkdir -p "$OUT/${run#"$RECORDS"/}"
                cp "$run"/* "$OUT/${run#"$RECORDS"/}"
            fi
        done
    }
    # Finished arms only: an arm paused at a checkpoint left a partial log, and restarts in a clean folder.
    copy_holding result.json "$RECORDS"/runs/labeled-*/seed-*/*/
    copy_holding encoder.safetensors "$RECORDS"/pretrain/*/
    echo "restore.sh: work folder rebuilt in $OUT (code $COMMIT)" | tee -a "$OUT/stage1.log"
fi

# The pretraining of (mask ratio, steps) exactly as the study runs it: the study's settings from run.sh,
# the same non-test view of the cache, the same folder and encoder layout.
pretrain_one() {
    # PYTHONSAFEPATH: a script read from stdin would otherwise import the checkout (the current folder)
    # before the frozen copy on PYTHONPATH.
    PYTHONSAFEPATH=1 PYTHONPATH=$(cd "$OUT/code" && pwd) python3 - "$1" "$2" <<EOF
import json
import sys
from pathlib import Path

from maeformer_fast.data import ensure_preprocessed
from maeformer_fast.data.cache import load_plan
from maeformer_fast.train.splits import make_splits
from maeformer_fast.train.study import Deadline, StudyConfig, pretraining_view
from maeformer_fast.train.study_converged import Converged

config = StudyConfig(**{**json.loads(Path("$OUT/study_config.json").read_text()),
                        "data": "$DATA", "out": "$OUT", "max_hours": None, "jobs": 1})
cache = Path(ensure_preprocessed(config.data, config.cache_dir))
labeled = [c["id"] for c in load_plan(cache)["cases"] if c["has_label"]]
splits = make_splits(labeled, config.val_fraction, config.test_fraction, config.split_seed)
data = pretraining_view(cache, set(splits.test), Path(config.out) / "pretrain_data")
stages = json.loads(Path("$OUT/choices.json").read_text())["encoder_stages"]
run = Converged(config, Path(config.out), cache, data, None, Deadline(None))
print(run.pretrain(stages, float(sys.argv[1]), int(sys.argv[2])), flush=True)
EOF
}
pretrain_one 0.6 20000 >"$OUT/restore-long.log" 2>&1 &
long=$!
{ pretrain_one 0.6 2000 && pretrain_one 0.75 2000; } >"$OUT/restore-short.log" 2>&1
wait "$long"

for run in "$RECORDS"/pretrain/*/; do
    name=$(basename "$run")
    python3 - "$run" "$OUT/pretrain/$name" <<'EOF'
import shutil
import sys
from pathlib import Path

from maeformer_fast.study.protocol import read_loss_curve


def losses(log: Path) -> dict[int, float]:
    return dict(zip(*read_loss_curve(log)))


committed, work = Path(sys.argv[1]), Path(sys.argv[2])
if (work / "pretrain.json").read_bytes() == (committed / "pretrain.json").read_bytes():
    print(f"{work}: the committed encoder and record")
    sys.exit()
original, rerun = losses(committed / "pretrain_log.csv"), losses(work / "pretrain_log.csv")
differ = [s for s in original if rerun.get(s) != original[s]]
if differ or len(rerun) != len(original):
    s = differ[0] if differ else None
    sys.exit(f"{work}: the rerun's loss differs from the committed log at {len(differ)} of "
             f"{len(original)} logged steps (first: step {s}, {original.get(s)} vs {rerun.get(s)})")
for name in ("pretrain.json", "pretrain_log.csv", "pretrain_config.json"):
    (work / name).replace(work / name.replace("pretrain", "pretrain_rerun", 1))
    shutil.copy(committed / name, work / name)
print(f"{work}: the rerun has the same loss as the committed log at all {len(original)} logged steps")
EOF
done | tee -a "$OUT/stage1.log"
