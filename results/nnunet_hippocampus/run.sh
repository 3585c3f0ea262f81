#!/usr/bin/env bash
# nnU-Net v2 on Task04_Hippocampus with 2 labeled cases: nnU-Net's own CNN (nnUNetTrainer_500it) vs
# our nnFormer from scratch (nnUNetTrainer_nnFormer_500it) vs our nnFormer from an encoder pretrained
# with this library on nnU-Net's preprocessed arrays (nnUNetTrainer_nnFormerMAE_500it), all for the
# same 500 optimizer steps of nnU-Net's batch, fold 0 of `maeformer nnunet-split --labeled 2 --seed S`
# for each seed S, scored by nnU-Net's own validation on the fixed validation cases.
#
#   . .venv-nnunet/bin/activate    # torch + pip install -e '.[nnunet]' (see .ci/run)
#   OMP_NUM_THREADS=1 JOBS=2 HOURS=2.5 bash results/nnunet_hippocampus/run.sh
#
# Rerun it to resume: each step that finished is skipped, the pretraining continues from its last
# checkpoint (--resume auto) and an nnU-Net run from its last epoch (nnUNetv2_train --c; the _500it
# trainers save one every epoch). Each call stops starting work after HOURS hours and stops a run in
# progress at the limit (a pretraining at its next step with a checkpoint, an nnU-Net run losing at
# most its current epoch). Commit results/nnunet_hippocampus/ after each chunk: the last step copies
# every finished run's records there and writes results.md.
set -euo pipefail
DATA=${DATA:-../shared/data/Task04_Hippocampus}   # the Medical Segmentation Decathlon folder
ROOT=$(realpath -m "${ROOT:-runs/nnunet_hippocampus}")
REPORT=${REPORT:-results/nnunet_hippocampus}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-1}             # nnU-Net runs at once (one per core with OMP_NUM_THREADS=1)
HOURS=${HOURS:-2}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-20000}   # the converged study's long pretraining
# The trainers compared; the one whose name has "MAE" starts from the pretrained encoder. (A rehearsal of
# this script: TRAINERS="nnUNetTrainer_nnFormer_5epochs nnUNetTrainer_nnFormerMAE_5epochs" SEEDS=0
# PRETRAIN_STEPS=20 ROOT=/tmp/rehearsal REPORT=/tmp/rehearsal/report.)
# Seed by seed they run in this order (scratch and MAE first: the comparison the study is about).
TRAINERS=${TRAINERS:-"nnUNetTrainer_nnFormer_500it nnUNetTrainer_nnFormerMAE_500it nnUNetTrainer_500it"}
DEADLINE=$(python3 -c "import time; print(int(time.time() + 3600 * float('$HOURS')))")
export nnUNet_raw=$ROOT/raw nnUNet_preprocessed=$ROOT/preprocessed nnUNet_results=$ROOT/results
# One core per run: augmentation in the training process, one worker for preprocessing and export.
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-0} nnUNet_def_n_proc=${nnUNet_def_n_proc:-1}
export nnUNet_extTrainer=$(maeformer nnunet-trainers)
DATASET=Dataset004_Hippocampus
PLANS_FOLDER=$nnUNet_preprocessed/$DATASET
ENCODER=$ROOT/pretrain/encoder.safetensors   # written when the pretraining has finished
mkdir -p "$ROOT" "$REPORT"
exec 9>"$ROOT/run.lock"  # one call at a time per folder: two would train the same runs side by side
flock -n 9 || { echo "run.sh: another call is working in $ROOT (its run.lock is held)" >&2; exit 1; }
seconds_left() { echo $((DEADLINE - $(date +%s))); }

# 1. nnU-Net's raw dataset and its 3d_fullres preprocessing. nnU-Net's converter wants an imagesTs
#    folder, which the shared copy lacks: it reads a linked copy with an empty one.
if [ ! -f "$PLANS_FOLDER/nnUNetPlans.json" ]; then
    msd=$ROOT/msd/Task04_Hippocampus
    mkdir -p "$msd/imagesTs"
    for item in dataset.json imagesTr labelsTr; do ln -sfn "$(realpath "$DATA/$item")" "$msd/$item"; done
    [ -d "$nnUNet_raw/$DATASET" ] || nnUNetv2_convert_MSD_dataset -i "$msd" -np 1
    # (planning takes nnUNet_n_proc_DA as a thread count, which must be positive)
    nnUNet_n_proc_DA=1 nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np 1 -npfp 1
fi

# 2. Per seed a view of the preprocessed dataset (links to everything but splits_final.json) whose
#    fold 0 trains on the 2 labeled cases the seed draws, so that seeds can run side by side.
for seed in $SEEDS; do
    view=$ROOT/seed-$seed/preprocessed/$DATASET
    mkdir -p "$view"
    for item in "$PLANS_FOLDER"/*; do
        case $(basename "$item") in splits_final*) ;; *) ln -sfn "$(realpath "$item")" "$view/";; esac
    done
    maeformer nnunet-split --dataset "$view" --labeled 2 --seed "$seed" >/dev/null
done

# 3. The work, JOBS tasks at a time: the pretraining first (where a trainer needs it), then seed by
#    seed (so that a chunk ends with whole seeds, each a paired comparison) each trainer's run in the
#    order of TRAINERS. An MAE run taken up while this call's pretraining runs waits for its end (a
#    core idle meanwhile), and is skipped (rerun) if the pretraining stopped unfinished.
pretrain_encoder() {
    # On exactly the arrays nnU-Net trains on (the plans' spacing, normalisation and axis order, a
    # crop of the plans' patch size), with the converged study's 3-stage encoder and settings, and
    # without the validation cases every score is taken on (nor the test cases): --holdout reads them
    # from the first seed's split record (the same fixed cases for every seed).
    local status=0 split=$ROOT/seed-${SEEDS%% *}/preprocessed/$DATASET/splits_final.maeformer.json
    echo "run.sh: pretraining ($PRETRAIN_STEPS steps)"
    timeout --signal=TERM "$(seconds_left)" maeformer pretrain --data "$PLANS_FOLDER/nnUNetPlans_3d_fullres" \
        --holdout "$split" \
        --out "$ROOT/pretrain" --steps "$PRETRAIN_STEPS" --mask-ratio 0.6 --batch-size 2 --lr 5e-4 \
        --weight-decay 0.05 --checkpoint-every 500 --preview-every 5000 --num-workers 0 --no-progress \
        --model-overrides '{"depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_sizes": [[4, 4, 4], [4, 4, 4], [4, 4, 4]]}' \
        --resume auto >>"$ROOT/pretrain.log" 2>&1 || status=$?
    # 75: stopped by the time limit's SIGTERM after a checkpoint; the next call continues it
    [ "$status" -eq 0 ] || echo "run.sh: pretraining stopped (exit $status); rerun to continue"
    touch "$ROOT/pretrain.ended"
}

train_one() {  # seed trainer: one nnU-Net run, started, continued or skipped when validated
    local seed=$1 trainer=$2
    local results=$ROOT/seed-$seed/results
    local fold=$results/$DATASET/${trainer}__nnUNetPlans__3d_fullres/fold_0
    [ -f "$fold/validation/summary.json" ] && return 0
    [ "$(seconds_left)" -gt 60 ] || return 0
    local start=()
    if [ -f "$fold/checkpoint_latest.pth" ] || [ -f "$fold/checkpoint_final.pth" ]; then
        start=(--c)
    elif [[ $trainer == *MAE* ]]; then
        until [ -f "$ENCODER" ] || [ -f "$ROOT/pretrain.ended" ]; do sleep 20; done
        [ -f "$ENCODER" ] || { echo "run.sh: seed $seed $trainer left for a later call (the pretraining stopped unfinished)"; return 0; }
        # The encoder as a whole-network checkpoint, its decoder and heads drawn by the seed (as the
        # other arms' random starts differ by run); it records the encoder's architecture in the
        # shared nnUNetPlans.json (the same as the scratch trainer's default: 3-stage small).
        local init=$ROOT/seed-$seed/init.pth
        flock "$ROOT/init.lock" bash -c '[ -f "$1" ] || maeformer nnunet-init "$2" --dataset 4 \
            --configuration 3d_fullres --trainer "$3" --seed "$4" --out "$1"' _ "$init" "$ENCODER" "$trainer" "$seed"
        start=(-pretrained_weights "$init")
    fi
    echo "run.sh: seed $seed $trainer ${start[*]:-(new)}"
    nnUNet_preprocessed=$ROOT/seed-$seed/preprocessed nnUNet_results=$results \
        timeout --signal=TERM "$(seconds_left)" nnUNetv2_train 4 3d_fullres 0 -tr "$trainer" -device cpu \
        "${start[@]}" >>"$ROOT/seed-$seed/$trainer.log" 2>&1 || echo "run.sh: seed $seed $trainer stopped (exit $?)"
}

task() { if [ "$1" = pretrain ]; then pretrain_encoder; else train_one "$@"; fi; }
export -f task pretrain_encoder train_one seconds_left
export ROOT DATASET PLANS_FOLDER ENCODER DEADLINE PRETRAIN_STEPS SEEDS
rm -f "$ROOT/pretrain.ended"
{
    if grep -q MAE <<<"$TRAINERS" && [ ! -f "$ENCODER" ]; then echo pretrain; fi
    for seed in $SEEDS; do for trainer in $TRAINERS; do echo "$seed $trainer"; done; done
} | xargs -P "$JOBS" -L 1 bash -c 'task "$@"' _

# 4. Records (nnU-Net's logs, progress plots, validation summaries; no weights) and results.md.
for seed in $SEEDS; do
    for trainer in $TRAINERS; do
        fold=$ROOT/seed-$seed/results/$DATASET/${trainer}__nnUNetPlans__3d_fullres/fold_0
        [ -d "$fold" ] || continue
        dest=$REPORT/records/seed-$seed/$trainer
        mkdir -p "$dest"
        cp "$fold"/training_log_*.txt "$fold"/progress.png "$fold"/debug.json "$dest"/ 2>/dev/null || true
        cp "$fold"/validation/summary.json "$dest"/ 2>/dev/null || true
    done
    mkdir -p "$REPORT/records/seed-$seed"
    cp "$ROOT/seed-$seed/preprocessed/$DATASET/splits_final.maeformer.json" "$REPORT/records/seed-$seed/"
done
mkdir -p "$REPORT/records/pretrain"
cp "$ROOT"/pretrain/*.json "$ROOT"/pretrain/*.csv "$REPORT/records/pretrain/" 2>/dev/null || true
if [ -n "$(find "$REPORT/records" -name summary.json)" ]; then
    maeformer nnunet-compare "$REPORT/records" --out "$REPORT/results.md"
else
    echo "run.sh: no run has finished yet; rerun to continue"
fi
