#!/usr/bin/env bash
# One device call of under 6 minutes: the Triton kernel tests on the GPU (attention, sparse conv, the
# sparse encoder against the masked dense reference, the op-count test), the per-layer time of the
# sparse convs against the dense conv (Synapse, batch 2 and 8), and the MAE step times sparse vs dense
# with profiles (small b4/b32, Synapse b2/b8, bf16). Every result under $OUT (logs, JSON, profiles).
# The other GPU scripts run on their own when there is time: gpu_compile.py (eager vs compiled vs
# compiled + CUDA graphs, ~7 min; fine-tuning and plain compilation still unmeasured), gpu_window_attention.py,
# gpu_training.py.
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
part kernel_tests 110 python -m pytest -q -p no:cacheprovider tests/test_sparse_conv.py tests/test_sparse_encoder.py \
    tests/test_window_attention.py -k "triton and not in_interpreter"
part sparse_conv_b2 45 python benchmarks/sparse_conv_layers.py --model synapse --batch-size 2 --device cuda --out "$out"
part sparse_conv_b8 55 python benchmarks/sparse_conv_layers.py --model synapse --batch-size 8 --device cuda --out "$out"
part profile 130 python benchmarks/gpu_profile_pretrain.py --out "$out"
