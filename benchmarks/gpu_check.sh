#!/usr/bin/env bash
# One device call that checks the Triton kernels against the reference on the GPU and runs the GPU
# benchmarks, about 7 minutes in all, every result under $OUT (logs, JSON, and training.md: the
# training run as a section ready for benchmarks/RESULTS.md).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # on a CUDA machine, from the repository root
#
# Each part has its own time limit and the next one runs whatever happened, so one failure or hang
# costs only its own slot. Needs torch, triton, pytest and hypothesis; installs nothing else.
set -u
out=${OUT:?set OUT to the folder for the results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, report the status
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - started)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" 2>&1
part kernel_tests 90 python -m pytest -q -p no:cacheprovider tests/test_window_attention.py -k "triton"
part window_attention 130 python benchmarks/gpu_window_attention.py --out "$out" --budget-s 100
part training 180 python benchmarks/gpu_training.py --out "$out" --budget-s 150
part profile 60 python benchmarks/gpu_profile_pretrain.py --out "$out"
