set -x
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=2
S="maeformer study --data ../shared/data/Task04_Hippocampus --out /tmp/study_long --labeled 16 --pretrain-steps 2000 --finetune-steps 200 --val-every 50 --max-val-cases 10 --no-progress"
date; T0=$(date +%s)
$S --seeds 2 --arms mae,scratch
echo "phase1 $(( $(date +%s) - T0 )) s"; date
$S --seeds 1 --arms scratch_matched
echo "phase2 $(( $(date +%s) - T0 )) s"; date
