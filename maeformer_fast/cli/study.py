"""``maeformer study``: the command line of the data-efficiency study."""

from __future__ import annotations

import argparse

from ..study.common import StudyConfig
from ..study.run import study

STUDY_HELP = {
    "data": "labeled dataset (Decathlon layout) or its preprocessing cache",
    "out": "work folder: pretrain/, runs/labeled-K/seed-S/ARM/ (each with result.json); rerun to resume",
    "report_dir": "where results.csv/json, the PNG plots and report.md go (default: OUT)",
    "labeled": "comma list of labeled training-case counts; 'all' = the whole training pool",
    "seeds": "seeds 0..N-1 per labeled count (each picks its own labeled subset and init)",
    "arms": "comma list of mae (MAE init), scratch (same steps), scratch_matched (pretrain + fine-tune "
    "steps)",
    "model": "model config: small, synapse, acdc, tumor",
    "crop_size": "training crop and sliding window in voxels (default: the model config's crop)",
    "batch_size": "batch size of pretraining and fine-tuning",
    "pretrain_steps": "MAE pretraining steps (run once; scratch_matched adds them to its fine-tuning steps)",
    "finetune_steps": "fine-tuning steps of the mae and scratch arms",
    "val_every": "validate every N steps (picks the best model; gives the Dice-vs-step curves)",
    "max_val_cases": "validate on the first N cases of the fixed validation split (speed)",
    "split_seed": "seed of the fixed test/validation split shared by every arm",
    "val_fraction": "share of labeled cases in the validation split",
    "test_fraction": "share of labeled cases in the test split (scores only, never selection)",
    "exclude_test": "keep the test-split images out of pretraining",
    "num_workers": "data loader worker processes per run",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "precision": "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16",
    "cache_dir": "where to build the preprocessing cache of a raw dataset",
    "progress": "show progress bars",
    "report_only": "only rewrite tables, plots and report from the arms finished under OUT (trains nothing); "
    "converged: also progress.md, the state of every pretraining run, tuning run and arm, finished or not",
    "test_data": "a separate labeled dataset folder (or cache) every arm's selected model is also scored on; "
    "never used for training, selection or preprocessing statistics",
    "max_hours": "stop after this many hours: no new run starts and a run in progress pauses at its next "
    "checkpoint (every <= 500 steps); rerun the command to continue",
    "protocol": "fixed (the fixed steps above) or converged (tuned, plateau-stopped arms, two pretraining "
    "budgets, compute in steps/FLOPs/wall-clock; docs/study.md)",
    "finetune_max_steps": "converged: the MAE arms' maximum fine-tuning steps (scratch adds the pretraining)",
    "plateau_patience": "converged: stop when the last N validations gained no more than --plateau-min-delta",
    "plateau_min_delta": "converged: validation Dice gain that counts as progress",
    "plateau_min_steps": "converged: never stop on a plateau before this step",
    "short_fraction": "converged: the short pretraining budget as a fraction of --pretrain-steps",
    "flatten_tolerance": "converged: the long pretraining has flattened when its mean loss over the last "
    "tenth of the steps is within this relative drop of the tenth before (reported)",
    "encoder_stages": "converged: comma list of encoder stage counts (3 = total stride 8 in the small "
    "config); several are chosen between on validation",
    "mask_ratios": "converged: pretraining mask ratios chosen between on validation",
    "tune_labeled": "converged: labeled count of the tuning runs",
    "tune_seed": "converged: seed of the tuning runs (outside the study's seeds)",
    "tune_lrs": "converged: MAE fine-tuning learning rates tried",
    "tune_warmups": "converged: warmup steps tried (scratch uses the one the MAE search picks)",
    "tune_layer_decays": "converged: layer-wise lr decays tried for the MAE encoder",
    "tune_freeze_steps": "converged: steps the MAE encoder stays frozen, tried",
    "tune_scratch_lrs": "converged: scratch learning rates tried (as many as the MAE recipe search runs)",
    "tune_scratch_warmups": "converged: scratch warmups tried after its learning rate, by the same "
    "coordinate search as MAE's (empty: the warmup the MAE search picks)",
    "tune_scratch_weight_decays": "converged: scratch AdamW weight decays tried after its warmup; the first "
    "is the base (empty: fine-tuning's default)",
    "only_arm": "SEED:ARM, e.g. 2:mae: train only that arm at each labeled count (the finished tuning and "
    "pretraining are reused; run several such processes side by side, one per arm)",
    "jobs": "converged: tuning runs that do not depend on each other (the pretexts, one knob's values, "
    "the scratch lrs) trained at once, each in its own process (e.g. one per CPU core, with "
    "OMP_NUM_THREADS=1)",
}


def cmd_study(args: argparse.Namespace) -> int:
    from .args import dataclass_from_args

    config = dataclass_from_args(StudyConfig, args)
    result = study(config)
    if config.report_only:
        print(f"study report written from {len(result.rows)} finished arm runs")
    else:
        done = "finished" if result.complete else "stopped by --max-hours (rerun to continue)"
        print(f"study {done} in {result.wall_time_s:.0f} s ({len(result.rows)} arm runs)")
    for key, path in result.files.items():
        print(f"{key}: {path}")
    # 75 (EX_TEMPFAIL): stopped by --max-hours, to be rerun; scripts that run it in chunks read this.
    return 0 if config.report_only or result.complete else 75


def add_study_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``maeformer study`` on the ``maeformer`` command's subparsers."""
    from .args import add_dataclass_arguments

    parser = subparsers.add_parser(
        "study",
        help="data-efficiency study: MAE init vs scratch vs scratch with matched steps, over labeled counts",
        description="Pretrain once on the non-test images (labels unused), then fine-tune per labeled "
        "count and seed from the MAE encoder, from scratch with the same steps, and from scratch with "
        "pretrain + fine-tune steps. Selects on the validation split, scores the test split, and writes "
        "a CSV/JSON table, PNG plots and a Markdown report. Rerun the same command to resume.",
    )
    add_dataclass_arguments(parser, StudyConfig, STUDY_HELP)
    parser.set_defaults(func=cmd_study)
    return parser
