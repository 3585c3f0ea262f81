#!/usr/bin/env bash
# The small config on a CUDA machine, the second device call of a GPU session (about 5 minutes, right
# after gpu_check.sh, whose warm-ups filled the compile caches for these shapes), ending in one table:
#  - the small config's sparse vs dense MAE steps at batch 32, eager and captured (the small config's
#    target: sparse >= 3x the captured dense step), on random tensors;
#  - a real pretraining run (`maeformer pretrain --compile`: resident data, captured step, the loss read
#    every 10 steps) whose steady ms/step is set against the random-tensor sparse step's; target:
#    within 10%;
#  - crops/s of each loader (`maeformer bench --loader`: worker processes, the resident volumes, the
#    host-staged copy) next to the crops/s the captured step consumes; target: resident >= 3x the step.
#
#   bash benchmarks/gpu_carry.sh                          # here, once: runs/gpu_carry (nibabel + data)
#   OUT=/some/folder bash benchmarks/gpu_feed_check.sh    # on the device, carrying runs/gpu_carry
#
# Rehearse on a CPU with DEVICE=cpu BATCH=2 STEPS=30 MODES=eager COMPILE=--no-compile PRECISION=fp32.
# Phases: warm-ups in parallel until WARM_UNTIL s (both random-tensor steps, and a short pretraining
# run that preprocesses the data and compiles the real-data graph), filling inductor's caches; then
# the measurements one after another on an idle machine, each cut to DEADLINE. The data is copied out
# of the carried folder first, so its preprocessing cache never lands in runs/gpu_carry.
# Limits: 100 s of warm-ups, then 50 + 60 + 60 s of measurements = 270 s, 30 s under the deadline
# (before 2026-12-06 they added to 370 s against 300, so the loaders got what was left).
# Results under $OUT: feed.txt (the table, also printed), rows.jsonl (bench rows), loaders.jsonl,
# pretrain_log.csv (the real run's log), feed.log (all output), gpu_results.csv (the measured step
# rows for benchmarks/gpu_results.csv: append them there).
set -u
out=${OUT:?set OUT to the folder for the results}
carry=${CARRY:-runs/gpu_carry}
dataset=${DATASET:-Task04_Hippocampus}
device=${DEVICE:-cuda}
batch=${BATCH:-32}
steps=${STEPS:-400}
modes=${MODES:-eager,captured}
compile=${COMPILE:---compile}
warm_until=${WARM_UNTIL:-100}
deadline=${DEADLINE:-300}
mkdir -p "$out"
scratch=$(mktemp -d)
log=$out/feed.log
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python -c "import nibabel" 2>/dev/null; then
    python -m pip install -q --no-index --no-deps --target /tmp/site "$carry"/wheels/*.whl >>"$log" 2>&1 ||
        { echo "no nibabel: run bash benchmarks/gpu_carry.sh here and carry $carry" | tee "$out/feed.txt"; exit 2; }
fi
[ -d "$carry/$dataset" ] || { echo "no $carry/$dataset: run bash benchmarks/gpu_carry.sh" | tee "$out/feed.txt"; exit 2; }
cp -r "$carry/$dataset" "$scratch/" && data=$scratch/$dataset
cli=(python -m maeformer_fast.cli) # `maeformer`, installed or not
setting=(--model small --batch-size "$batch" --device "$device" --precision "${PRECISION:-bf16}")
quiet=(--no-progress --log-every 10 --checkpoint-every 1000000 --preview-every 1000000)
status_file=$scratch/status log_file=$log min_limit=15
source benchmarks/gpu_limited.sh # limited NAME LIMIT COMMAND..., software_versions

# 1. Warm-ups, in parallel: the random-tensor steps, and a short real run (preprocessing included).
(timeout "$warm_until" "${cli[@]}" bench "${setting[@]}" --cases sparse,dense --modes "$modes" --seconds 0 \
    --no-flops >"$scratch/warm_bench.log" 2>&1; echo "warm_bench: exit $?" >>"$scratch/status") &
(timeout "$warm_until" "${cli[@]}" pretrain --data "$data" --out "$scratch/warm_run" --steps 20 "$compile" \
    "${setting[@]}" "${quiet[@]}" >"$scratch/warm_run.log" 2>&1; echo "warm_run: exit $?" >>"$scratch/status") &
wait
cat "$scratch"/warm_*.log >>"$log"

# 2. The measurements, one at a time, the random-tensor steps first (the real run is set against them).
limited random_steps 50 "${cli[@]}" bench "${setting[@]}" --cases sparse,dense --modes "$modes" --seconds 3 \
    --json "$out/rows.jsonl"
limited real_run 60 "${cli[@]}" pretrain --data "$data" --out "$scratch/run" --steps "$steps" "$compile" \
    "${setting[@]}" "${quiet[@]}"
cp "$scratch/run/pretrain_log.csv" "$out/" 2>/dev/null
limited loaders 60 "${cli[@]}" bench --loader --data "$data" "${setting[@]}" "$compile" --seconds 6 \
    --num-workers 4 --json "$out/loaders.jsonl"

# 3. One table.
{
    echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "$device")"
    echo "software: $(software_versions)"
    cat "$scratch/status"
    python benchmarks/feed_table.py "$out/rows.jsonl" "$out/loaders.jsonl" "$out/pretrain_log.csv"
} | tee "$out/feed.txt"
python benchmarks/gpu_results.py --csv "$out/gpu_results.csv" --source gpu_feed_check.sh "$out/rows.jsonl"
