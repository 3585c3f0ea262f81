"""nnU-Net runs side by side: the validation Dice of every ``summary.json`` under a folder, per trainer
and per run, with paired differences between trainers.

nnU-Net's final validation writes ``.../<trainer>__<plans>__<configuration>/fold_K/validation/summary.json``
(``foreground_mean`` over the labels and ``mean`` per label, each averaged over the validation cases).
A summary's trainer is the first folder of its path that starts with ``nnUNetTrainer`` (without the
``__plans__configuration`` part); its run is the rest of the path, so the runs of different trainers
under ``seed-0/...`` pair up (``results/nnunet_hippocampus/run.sh`` lays its records out that way, as
``seed-S/<trainer>/summary.json``). Pure JSON work, no nnunetv2 import.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

SUMMARY = "summary.json"
TRAINER_PREFIX = "nnUNetTrainer"


@dataclass(frozen=True)
class ValidationResult:
    """One run's validation Dice: ``dice`` per label name, and ``"mean"`` (nnU-Net's foreground mean)."""

    trainer: str
    run: str
    dice: dict[str, float]


def read_summary(path: Path, root: Path) -> ValidationResult:
    """The Dice values of nnU-Net's ``summary.json`` at ``path``, named by its place under ``root``."""
    parts = path.relative_to(root).parts[:-1]
    trainers = [i for i, part in enumerate(parts) if part.startswith(TRAINER_PREFIX)]
    if not trainers:
        raise ValueError(
            f"{path}: no folder of its path under {root} names an nnU-Net trainer ({TRAINER_PREFIX}...)"
        )
    index = trainers[0]
    run = "/".join(parts[:index] + parts[index + 1 :]) or "."
    try:
        summary = json.loads(path.read_text())
        dice = {label: float(values["Dice"]) for label, values in summary["mean"].items()}
        dice["mean"] = float(summary["foreground_mean"]["Dice"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an nnU-Net validation summary ({error!r})") from error
    return ValidationResult(parts[index].split("__")[0], run, dice)


def find_results(root: str | Path) -> list[ValidationResult]:
    """Every validation summary under ``root``, sorted by trainer and run."""
    root = Path(root)
    results = [read_summary(path, root) for path in sorted(root.rglob(SUMMARY))]
    if not results:
        raise FileNotFoundError(f"{root}: no nnU-Net validation {SUMMARY} below it")
    return sorted(results, key=lambda result: (result.trainer, result.run))


def _mean_sd(values: list[float], sign: str = "") -> str:
    """The mean (with ``sign`` "+" a signed one) and, over two or more values, ± the sample sd."""
    text = f"{statistics.mean(values):{sign}.3f}"
    return text + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def comparison_markdown(results: list[ValidationResult]) -> str:
    """Markdown tables: Dice per trainer (mean ± sample sd over its runs), the foreground mean Dice of
    every run, and for each pair of trainers the mean paired difference over the runs both have.

    Trainers go by mean foreground Dice, highest first, and each pair reads "higher - lower", so the
    differences come out positive whatever the trainers are named."""
    by_trainer: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        by_trainer.setdefault(r.trainer, {})[r.run] = r.dice

    def rank(trainer: str) -> tuple[float, str]:
        return -statistics.mean(dice["mean"] for dice in by_trainer[trainer].values()), trainer

    trainers = sorted(by_trainer, key=rank)
    labels = sorted({label for r in results for label in r.dice if label != "mean"})
    lines = [
        "| trainer | runs | " + " | ".join(f"Dice {label}" for label in labels) + " | Dice foreground mean |",
        "|---|---|" + "---|" * (len(labels) + 1),
    ]
    for trainer in trainers:
        dices = list(by_trainer[trainer].values())
        cells = [_mean_sd([dice[label] for dice in dices if label in dice]) for label in labels]
        cells.append(_mean_sd([dice["mean"] for dice in dices]))
        lines.append(f"| {trainer} | {len(dices)} | " + " | ".join(cells) + " |")
    runs = sorted({r.run for r in results})
    lines += ["", "Foreground mean Dice per run:", "", "| run | " + " | ".join(trainers) + " |",
              "|---|" + "---|" * len(trainers)]  # fmt: skip
    for run in runs:
        cells = [f"{by_trainer[t][run]['mean']:.3f}" if run in by_trainer[t] else "" for t in trainers]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    pairs = []
    for first, second in combinations(trainers, 2):
        shared = [run for run in runs if run in by_trainer[first] and run in by_trainer[second]]
        if shared:
            differences = [by_trainer[first][run]["mean"] - by_trainer[second][run]["mean"] for run in shared]
            wins = sum(difference > 0 for difference in differences)
            mean = _mean_sd(differences, "+")
            pairs.append(f"| {first} - {second} | {len(shared)} | {mean} | {wins} / {len(shared)} |")
    if pairs:
        lines += ["", "Paired differences of the foreground mean Dice (runs both trainers have):", ""]
        lines += ["| difference | runs | mean ± sd | runs where > 0 |", "|---|---|---|---|", *pairs]
    return "\n".join(lines) + "\n"
