#!/bin/bash
# The hippocampus study on one GPU: preprocess + pretrain once, then one study process per labeled
# count side by side (arms write separate folders), then the report from every finished arm.
cd "$(dirname "$0")"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); nvidia-smi -L; nproc
S="python3 study_cli.py study --out /tmp/st --pretrain-steps 400 --finetune-steps 200 --val-every 50 --max-val-cases 10 --precision fp32 --num-workers 3"
echo "command: $S [--labeled K --seeds 5], one process per K"
timeout 200 $S --data data/Task04_Hippocampus --cache-dir /tmp/cache --labeled 4 --seeds 0 > $OUT/pretrain.log 2>&1
echo "pretrain phase rc=$? at $(( $(date +%s) - T0 )) s"; tail -3 /tmp/st/pretrain/pretrain_log.csv
cat /tmp/st/pretrain/pretrain.json || { tail -30 $OUT/pretrain.log; exit 1; }
LEFT=$(( 440 - ($(date +%s) - T0) ))
for k in 4 16 all; do timeout $LEFT $S --data /tmp/cache --labeled $k --seeds 5 > /tmp/log_$k 2>&1 & done
sleep 60; tail -2 /tmp/st/runs/*/seed-0/*/finetune_log.csv; wait
echo "fine-tune phase done at $(( $(date +%s) - T0 )) s"
for k in 4 16 all; do grep "study:" /tmp/log_$k; tail -3 /tmp/log_$k; done > $OUT/finetune.log 2>&1
$S --data /tmp/cache --report-only --report-dir $OUT 2>&1 | tail -3
cat $OUT/report.md; echo "total $(( $(date +%s) - T0 )) s"
