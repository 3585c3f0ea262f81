#!/usr/bin/env bash
# One device call of under 7 minutes (give it timeout_s 420) that ends in one table: the Triton kernel
# tests and the CUDA-only captured-step test on the GPU, then `maeformer bench` -- the command users
# run -- for the sparse vs dense MAE steps (Synapse crop 64x128x128 at batch 8 and 2) and the
# fine-tuning step (Synapse, batch 2), bf16, eager / captured (compiled + CUDA graphs), each with
# ms/step, launches and kernels per step, MFU and peak memory; and, where the official model files
# travel (benchmarks/README.md says how to extract them; gpu_carry.sh packs them), the captured
# fine-tuning step against the official nnFormer's (benchmarks/official_step.py --compile, Synapse,
# batch 2).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # on a CUDA machine, from the repository root
#
# The second device call of a GPU session, about 5 minutes, right after this one (the machine and its
# compile caches still warm): benchmarks/gpu_feed_check.sh -- the small config at batch 32 (sparse vs
# dense, warmed up here) and the data feed.
#
# Why it is built this way. A session has 15 minutes of device time (~40 s of it the machine's start),
# and compilation is the cost: each compiled (case, shape, mode) took 60-78 s to warm up on an H200
# (benchmarks/RESULTS.md; the model alone, the optimizer step has been compiled too since), and this
# two calls hold eleven of them, ~12 minutes one after another. So:
#  1. Warm, 0-150 s: all compile at once, one process per (case, shape) -- five `maeformer bench
#     --seconds 0 --no-flops` (Synapse b8 sparse and dense, fine-tuning b2, Synapse b2 sparse and
#     dense), each compiling its captured mode, and official_step.py's captured step -- niced, next to the GPU
#     tests, with 2 compile threads each (six compiling processes and two tests on 16 cores: the
#     2026-11-29 run gave eight processes 4 threads each, and one cold compile alone took 60-78 s).
#     The small config at batch 32 warms up in gpu_feed_check.sh, the call that measures it. A
#     warm-up counts no FLOPs; the measurements count each case once (--flops-cache).
#     This fills inductor's and Triton's on-disk caches; the warm-up rows' timings overlap and are only
#     logged (warm.log), though their warm-up column is the cold compile time under that load.
#  2. Measure, from when the warm-ups end to 380 s: one `maeformer bench` per shape, one after another
#     on an otherwise idle GPU and CPU, sparse and dense side by side in one process, the compiled
#     warm-ups now loading from the caches (on the loaded 2-core CPU, small config at 32^3, batch 1, a
#     second `maeformer bench --modes compiled` warmed up in 37 s instead of 321 s for the sparse step
#     and 85 s instead of 622 s for fine-tuning).
#     Most important first: Synapse b8 sparse vs dense (eager, captured), the fine-tuning
#     step (eager, captured), ours captured against the official code, Synapse b2 sparse vs dense
#     (eager, captured). Each part has a time limit, cut to what is left before the deadline, each row
#     reaches rows.jsonl when measured: a cache miss or a hang costs only the rows after it, and a
#     shape that was not reached is named in the status lines.
# Limits: 150 s of warm-ups, then 80 + 50 + 45 + 40 s of measurements = 365 s, under the 380 s deadline.
# Plain compiled (without CUDA graphs) is no longer measured here (its warm-up doubled Synapse b8's
# compile; the 2026-11-29 rows in benchmarks/gpu_results.csv have it): run `maeformer bench --modes
# compiled` on its own where the graphs-vs-fusion question matters.
# Per-layer sparse conv timings (sparse_conv_layers.py --device cuda), the kernel-level profile
# (gpu_profile_pretrain.py) and the other GPU scripts run on their own.
#
# Results under $OUT (six files; the device returns eight at most): table.txt (the statuses and the
# table, also printed), rows.jsonl (every measured row), official_step.json, bench.log, warm.log,
# tests.log, and gpu_results.csv (the measured rows for benchmarks/gpu_results.csv: append them there).
# Needs torch, triton, pytest and hypothesis; installs nothing. The official model files travel in
# runs/gpu_carry/official_nnformer (benchmarks/gpu_carry.sh copies them from runs/official_nnformer).
set -u
out=${OUT:?set OUT to the folder for the results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
warm_until=${WARM_UNTIL:-150} # seconds from the start: warm-ups and tests still running then are stopped
deadline=${DEADLINE:-380}     # seconds from the start: the last measurement ends by then
logs=$(mktemp -d) # per-process logs, gathered into $out at the end
synapse=(--model synapse --crop-size 64 128 128)
bench=(python -m maeformer_fast.cli bench --device cuda --precision bf16) # `maeformer bench`, installed or not

background() { # NAME COMMAND...: run in the background (niced by $NICE) until warm_until; log $logs/NAME.log
    local name=$1 limit=$((warm_until - SECONDS))
    shift
    (
        timeout "$limit" nice -n "${NICE:-0}" "$@" >"$logs/$name.log" 2>&1
        echo "$name: exit $? after $SECONDS s" >>"$logs/status"
    ) &
}

status_file=$logs/status log_file=$out/bench.log
source benchmarks/gpu_limited.sh # limited NAME LIMIT COMMAND..., software_versions

measure() { # NAME LIMIT ARGS...: one `maeformer bench` (limited), its rows into rows.jsonl
    local name=$1 limit=$2
    shift 2
    limited "$name" "$limit" "${bench[@]}" --seconds 2 --json "$out/rows.jsonl" \
        --flops-cache "$logs/flops.json" "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$logs/gpu" 2>&1

# 1. The GPU tests (at full priority) and the compile warm-ups, all at once.
background kernel_tests python -m pytest -q -p no:cacheprovider tests/ops/test_sparse_conv.py \
    tests/models/test_sparse_encoder.py tests/ops/test_window_attention.py -k "triton and not in_interpreter"
background captured_step_test python -m pytest -q -p no:cacheprovider tests/train/test_captured_step.py
export NICE=5 TORCHINDUCTOR_COMPILE_THREADS=2 # six compiling processes and two tests share 16 cores
warm=("${bench[@]}" --seconds 0 --no-flops)
background warm_b8_sparse "${warm[@]}" "${synapse[@]}" --batch-size 8 --cases sparse --modes captured
background warm_b8_dense "${warm[@]}" "${synapse[@]}" --batch-size 8 --cases dense --modes captured
background warm_finetune "${warm[@]}" "${synapse[@]}" --batch-size 2 --cases finetune --modes captured
official=${CARRY:-runs/gpu_carry}/official_nnformer # the official model files (gpu_carry.sh)
[ -d "$official" ] || official=runs/official_nnformer  # or carried by themselves
official_step=(python benchmarks/official_step.py --official "$official" --device cuda --compile)
if [ -d "$official" ]; then
    background warm_official "${official_step[@]}" --rounds 1 --steps-per-round 1
fi
background warm_b2_sparse "${warm[@]}" "${synapse[@]}" --batch-size 2 --cases sparse --modes captured
background warm_b2_dense "${warm[@]}" "${synapse[@]}" --batch-size 2 --cases dense --modes captured
unset NICE TORCHINDUCTOR_COMPILE_THREADS
wait

# 2. The measurements, one at a time, most important first.
measure synapse_b8 80 "${synapse[@]}" --batch-size 8 --cases sparse,dense --modes eager,captured
measure finetune_b2 50 "${synapse[@]}" --batch-size 2 --cases finetune --modes eager,captured
if [ -d "$official" ]; then
    limited official_step 45 "${official_step[@]}" --json "$out/official_step.json"
else
    echo "official_step: skipped ($official not carried)" >>"$logs/status"
fi
measure synapse_b2 40 "${synapse[@]}" --batch-size 2 --cases sparse,dense --modes eager,captured
# small b32: warmed up and measured by gpu_feed_check.sh, the next call

# 3. One table: the GPU, each part's status, the tests' summaries, the measured rows.
cat "$logs"/warm_*.log >"$out/warm.log" 2>/dev/null
cat "$logs"/kernel_tests.log "$logs"/captured_step_test.log >"$out/tests.log" 2>/dev/null
{
    echo "GPU: $(cat "$logs/gpu")"
    echo "software: $(software_versions)"
    cat "$logs/status"
    for name in kernel_tests captured_step_test; do
        echo "$name: $(grep -E '(passed|failed|error|no tests ran)' "$logs/$name.log" | tail -1)"
    done
    python - "$out/rows.jsonl" <<'EOF'
import json
import sys
from pathlib import Path

from maeformer_fast.bench.table import format_table

rows_file = Path(sys.argv[1])
rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
print("\n".join(format_table(rows)) if rows else "no bench rows were measured")
EOF
    if [ -f "$out/official_step.json" ]; then # official_step.py's own table, from the log
        sed -n '/fine-tuning step, crop/,/official \/ ours/p' "$out/bench.log"
    fi
} | tee "$out/table.txt"
python benchmarks/gpu_results.py --csv "$out/gpu_results.csv" --source gpu_check.sh "$out/rows.jsonl"
