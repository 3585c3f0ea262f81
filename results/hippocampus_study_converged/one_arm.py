"""``maeformer study`` cut down to one arm: ``python one_arm.py SEED ARM study ARGS...`` runs the
library on PYTHONPATH (run.sh's frozen copy) with the converged protocol's arm loop reduced to (SEED,
ARM) at each labeled count in ARGS, so that run.sh (``BY_ARM=1``) can train the last arms of one
labeled count side by side instead of one after another.

Only the order of the arms changes, not what any arm computes: an arm seeds itself from its own seed
(``finetune``: ``torch.manual_seed``), reads only the finished pretraining, tuning choices and cached
data, and writes only its own folder; a finished arm is skipped and a paused one resumes from its
checkpoint, as in the full loop."""

import sys

from maeformer_fast.cli import main
from maeformer_fast.train import study_converged
from maeformer_fast.train.study import CONVERGED_ARMS

if len(sys.argv) < 4 or sys.argv[2] not in CONVERGED_ARMS:
    sys.exit(f"usage: python one_arm.py SEED {{{','.join(CONVERGED_ARMS)}}} study ARGS...")
seed, arm = int(sys.argv[1]), sys.argv[2]
study_converged.arm_order = lambda seeds, counts, arms: [(seed, labeled, arm) for labeled in counts]
sys.exit(main(sys.argv[3:]))
