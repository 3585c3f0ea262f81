"""``maeformer report``: a run's curves from its CSV logs, as one PNG; the summary a finished
fine-tuning run prints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_report(args: argparse.Namespace) -> int:
    from ..train.curves import plot_run, read_run, summarise

    path = plot_run(args.run, args.out)
    for log in read_run(args.run):  # the numbers the plot annotates, for a terminal without a viewer
        print(summarise(log).describe())
    print(f"wrote {path}")
    return 0


def register(sub: Any) -> None:
    """Add the ``report`` subcommand to the ``maeformer`` subparsers ``sub``."""
    report = sub.add_parser(
        "report",
        help="plot a run's loss, lr and validation Dice curves to a PNG (no TensorBoard needed)",
        description="Plot the curves of a `maeformer pretrain` or `finetune` output folder from its "
        "pretrain_log.csv and/or finetune_log.csv: training loss (and its running mean), learning rate, "
        "validation mean Dice with the best step marked, and seconds per step. Works on a run still "
        "training.",
    )
    report.add_argument("run", type=Path, metavar="RUN", help="the run's output folder (--out of the run)")
    report.add_argument("--out", type=Path, default=None, metavar="PNG",
                        help="picture to write (default: RUN/curves.png)")  # fmt: skip
    report.set_defaults(func=cmd_report)


def report_finetune(result: Any) -> None:
    """Print a finished fine-tuning run (a ``FinetuneResult``): its validation curve, best model and
    test Dice."""
    curve = ", ".join(f"{step}: {dice:.3f}" for step, dice in result.curve)
    print(f"fine-tuned in {result.wall_time_s:.0f} s; validation mean Dice by step: {curve}")
    print(f"best model (step {result.best_step}, val Dice {result.best_val_dice:.4f}): {result.model_path}")
    if result.test_dice:
        print(f"test split ({len(result.splits['test'])} cases): Dice {result.test_dice}")
