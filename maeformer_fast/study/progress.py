"""Where a converged study stands (``maeformer study --protocol converged --report-only``): every
pretraining run, tuning run and arm under OUT, finished or still training, and the choices made so far,
as ``progress.md`` with two plots.

A study of many CPU-hours runs in chunks for days; this reads only the runs' records (``pretrain.json``
and ``result.json`` of finished runs, the CSV logs of runs in progress, ``choices.json``), so it can be
written before any arm has finished, between chunks or while a chunk trains."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import NamedTuple

from ..data.io import atomic_write_text
from ..train.runtime import complete_rows


class RunState(NamedTuple):
    """A pretraining or fine-tuning run, finished or not. ``best``/``best_step``: best validation Dice
    and its step (fine-tuning; None before the first validation), ``last_loss``: the last logged loss,
    ``curve``: (step, value) of validation Dice (fine-tuning) or loss (pretraining)."""

    name: str
    finished: bool
    steps: int
    max_steps: int
    wall_s: float
    last_loss: float | None
    best: float | None
    best_step: int | None
    curve: list[tuple[int, float]]


def _log_rows(path: Path) -> list[dict[str, str]]:
    return complete_rows(path) if path.is_file() else []


def _max_steps(folder: Path, config_file: str) -> int:
    config = folder / config_file
    return int(json.loads(config.read_text())["steps"]) if config.is_file() else 0


def finetune_state(folder: Path, name: str | None = None) -> RunState:
    """A fine-tuning run's state (tuning run or arm, named ``name`` or its folder's name): from its
    ``result.json`` when finished, else from ``finetune_log.csv``."""
    name = name or folder.name
    rows = _log_rows(folder / "finetune_log.csv")
    last_loss = float(rows[-1]["loss"]) if rows else None
    result = folder / "result.json"
    if result.is_file():
        r = json.loads(result.read_text())
        curve = [(int(step), float(dice)) for step, dice in r["curve"]]
        return RunState(name, True, r["steps"], r["max_steps"], r["wall_time_s"], last_loss,
                        r["best_val_dice"], r["best_step"], curve)  # fmt: skip
    curve = [(int(r["step"]), float(r["val_dice"])) for r in rows if r["val_dice"]]
    best_step, best = max(curve, key=lambda point: point[1]) if curve else (None, None)
    steps, wall = (int(rows[-1]["step"]), float(rows[-1]["elapsed_s"])) if rows else (0, 0.0)
    max_steps = _max_steps(folder, "finetune_config.json")
    return RunState(name, False, steps, max_steps, wall, last_loss, best, best_step, curve)


def arm_position(folder: Path) -> tuple[float, int, str]:
    """Sort key of ``OUT/runs/labeled-K/seed-S/ARM``: labeled count (``all`` last), seed, arm."""
    labeled = folder.parent.parent.name.removeprefix("labeled-")
    seed = int(folder.parent.name.removeprefix("seed-"))
    return (math.inf if labeled == "all" else int(labeled), seed, folder.name)


def pretrain_state(folder: Path) -> RunState:
    """A pretraining run's state: from its ``pretrain.json`` when finished, else from its log."""
    rows = _log_rows(folder / "pretrain_log.csv")
    curve = [(int(r["step"]), float(r["loss"])) for r in rows]
    record = folder / "pretrain.json"
    if record.is_file():
        r = json.loads(record.read_text())
        return RunState(folder.name, True, r["steps"], r["steps"], r["wall_time_s"], r["final_loss"],
                        None, None, curve)  # fmt: skip
    steps, last_loss = curve[-1] if curve else (0, None)
    wall = float(rows[-1]["elapsed_s"]) if rows else 0.0
    max_steps = _max_steps(folder, "pretrain_config.json")
    return RunState(folder.name, False, steps, max_steps, wall, last_loss, None, None, curve)


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


STATE = {True: "finished", False: "in progress"}


def _finetune_table(runs: list[RunState]) -> list[str]:
    return [
        "| run | state | steps | maximum | best val Dice | at step | last loss | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r.name} | {STATE[r.finished]} | {r.steps} | {r.max_steps} | {_num(r.best)} | "
            f"{'n/a' if r.best_step is None else r.best_step} | {_num(r.last_loss)} | {r.wall_s:.0f} |"
            for r in runs
        ),
    ]


def progress_markdown(
    out: Path, pretraining: list[RunState], tuning: list[RunState], arms: list[RunState]
) -> str:
    """progress.md: pretraining, tuning and arm runs (finished or in progress), choices so far."""
    finished_arms = sum(r.finished for r in arms)
    lines = [
        "# The converged study: progress",
        "",
        f"Read from `{out}` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; runs in progress "
        "as of their last logged step (a run resumes from its last checkpoint). Validation Dice only: "
        "the test scores of finished arms are in the study's report.",
        "",
        "## Pretraining (masked-unit loss; curves: `pretrain_loss.png`)",
        "",
        "| run | state | steps | of | last loss | wall (s) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r.name} | {STATE[r.finished]} | {r.steps} | {r.max_steps} | {_num(r.last_loss)} | "
            f"{r.wall_s:.0f} |"
            for r in pretraining
        ),
        "",
        "## Tuning runs (validation Dice; curves: `tuning_val_dice.png`)",
        "",
        *_finetune_table(tuning),
        "",
        f"## Arms ({finished_arms} finished, {len(arms) - finished_arms} in progress)",
        "",
        *(_finetune_table(arms) if arms else ["None started yet."]),
        "",
        "## Choices so far",
        "",
    ]
    choices = out / "choices.json"
    if choices.is_file():
        lines += ["```json", choices.read_text().strip(), "```"]
    else:
        lines.append("None fixed yet: `choices.json` is written when the tuning stage ends.")
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[RunState], ylabel: str, path: Path, log_x: bool = False) -> None:
    """One line per run (its curve), finished runs solid, runs in progress dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run.curve:
            steps, values = zip(*run.curve)
            ax.plot(steps, values, lw=1, ls="-" if run.finished else "--", label=run.name)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_progress(out: Path, report_dir: Path) -> dict[str, Path]:
    """Write progress.md, pretrain_loss.png and tuning_val_dice.png for the study under ``out``."""
    pretraining = [pretrain_state(f) for f in sorted(out.glob("pretrain/*/")) if f.is_dir()]
    trials = out / "tuning.json"  # the finished tuning runs in the order the search ran them
    order = [t["name"] for t in json.loads(trials.read_text())] if trials.is_file() else []
    folders = [f for f in out.glob("tuning/*/") if f.is_dir()]
    folders.sort(key=lambda f: (order.index(f.name) if f.name in order else len(order), f.name))
    tuning = [finetune_state(f) for f in folders]
    if not pretraining and not tuning:
        raise FileNotFoundError(f"{out}: no pretraining or tuning run yet (pretrain/*, tuning/*)")
    arm_folders = sorted((f for f in out.glob("runs/labeled-*/seed-*/*/") if f.is_dir()), key=arm_position)
    arms = [finetune_state(f, f.relative_to(out / "runs").as_posix()) for f in arm_folders]
    report_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "progress": report_dir / "progress.md",
        "pretrain_plot": report_dir / "pretrain_loss.png",
        "tuning_plot": report_dir / "tuning_val_dice.png",
    }
    atomic_write_text(files["progress"], progress_markdown(out, pretraining, tuning, arms))
    plot_runs(pretraining, "masked-unit loss (norm-pix)", files["pretrain_plot"], log_x=True)
    plot_runs(tuning, "validation mean Dice", files["tuning_plot"])
    return files
