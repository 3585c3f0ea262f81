"""A run's curves from its CSV logs, as one PNG: no TensorBoard needed (``maeformer report``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..weights import replace_with
from .runtime import complete_rows

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LOG_FILES = {"pretrain": "pretrain_log.csv", "finetune": "finetune_log.csv"}


@dataclass(frozen=True)
class RunLog:
    """One CSV log of a run: its steps and every other column as floats (NaN where a row has no value,
    e.g. val_dice on the steps without validation)."""

    kind: str  # "pretrain" or "finetune"
    path: Path
    step: np.ndarray  # int64, one per row
    columns: dict[str, np.ndarray]  # float64, by header name: loss, lr, val_dice, elapsed_s, ...

    def column(self, name: str) -> np.ndarray | None:
        """The column, or None where the log lacks it or has no value in it."""
        values = self.columns.get(name)
        return None if values is None or np.isnan(values).all() else values


@dataclass(frozen=True)
class RunSummary:
    """What the plot annotates: the last step and loss, the best validation and the step time."""

    kind: str
    last_step: int
    final_loss: float
    best_val_dice: float | None  # None: a pretraining log, or no validation yet
    best_step: int | None
    step_time_s: float | None  # median seconds per step; None without elapsed_s

    def describe(self) -> str:
        text = f"{self.kind}: {self.last_step} steps, final loss {self.final_loss:.4g}"
        if self.best_val_dice is not None:
            text += f", best val Dice {self.best_val_dice:.4f} at step {self.best_step}"
        if self.step_time_s is not None:
            text += f", {self.step_time_s:.3g} s/step"
        return text


def read_log(path: Path, kind: str) -> RunLog:
    """Read a run's CSV log; a run still writing it may have a half-written last line, left out."""
    rows = complete_rows(path)
    if not rows:
        raise ValueError(f"{path}: the log has no steps yet (header only)")
    header = [name for name in rows[0] if name is not None]  # None: the extra fields of a longer row
    if not {"step", "loss"} <= set(header):
        raise ValueError(f"{path}: not a training log: no step or loss column (header: {', '.join(header)})")
    names = [name for name in header if name != "step"]
    try:  # an empty field, or a missing one (None) in a short row, has no value: NaN
        step = np.array([int(row["step"]) for row in rows], dtype=np.int64)
        columns = {n: np.array([float(row[n] or "nan") for row in rows], dtype=np.float64) for n in names}
    except ValueError as error:
        raise ValueError(f"{path}: a row that is not numbers: {error}") from error
    return RunLog(kind, path, step, columns)


def read_run(run: Path) -> list[RunLog]:
    """The pretraining and/or fine-tuning logs of the run folder ``run``."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    logs = [read_log(run / name, kind) for kind, name in LOG_FILES.items() if (run / name).is_file()]
    if not logs:
        raise FileNotFoundError(f"{run}: no training log: looked for {' and '.join(LOG_FILES.values())}")
    return logs


def step_times(log: RunLog) -> tuple[np.ndarray, np.ndarray] | None:
    """Seconds per step between consecutive rows (a pretraining log has a row every --log-every steps),
    at the later row's step; None without elapsed_s or two rows. Fine-tuning's validation and
    checkpoint time lands in the step after them."""
    elapsed = log.column("elapsed_s")
    if elapsed is None:
        return None
    steps, seconds = np.diff(log.step), np.diff(elapsed)
    keep = (steps > 0) & np.isfinite(seconds)
    return (log.step[1:][keep], seconds[keep] / steps[keep]) if keep.any() else None


def summarise(log: RunLog) -> RunSummary:
    """The log's last step and loss, its best validation Dice (the earliest step of a tie, as
    fine-tuning keeps its best model) and median step time."""
    best_dice = best_step = None
    if (dice := log.column("val_dice")) is not None:
        best = int(np.nanargmax(dice))
        best_dice, best_step = float(dice[best]), int(log.step[best])
    times = step_times(log)
    median = None if times is None else float(np.median(times[1]))
    final_loss = float(log.columns["loss"][-1])
    return RunSummary(log.kind, int(log.step[-1]), final_loss, best_dice, best_step, median)


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start): a trailing mean, so
    the smoothed line does not reach ahead of the steps it averages."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def spans_decades(values: np.ndarray) -> bool:
    """Whether positive ``values`` span more than 10x: such a curve is read on a log axis."""
    finite = values[np.isfinite(values)]
    return bool(len(finite) and finite.min() > 0 and finite.max() > 10 * finite.min())


def draw_loss(axis: Axes, log: RunLog, summary: RunSummary) -> None:
    loss = log.columns["loss"]
    window = max(1, round(0.05 * len(loss)))  # ~5% of the rows
    # faint under its running mean, which shows the trend through the batch-to-batch noise
    axis.plot(
        log.step, loss, color="tab:blue", alpha=0.35 if window > 1 else 1.0, linewidth=0.8, label="loss"
    )
    if window > 1:
        axis.plot(log.step, running_mean(loss, window), color="tab:blue", label=f"mean of {window} rows")
        axis.legend(fontsize=8)
    if spans_decades(loss):
        axis.set_yscale("log")
    axis.set_title(f"{log.kind} loss (final {summary.final_loss:.4g})", fontsize=10)


def draw_lr(axis: Axes, log: RunLog) -> None:
    axis.plot(log.step, log.columns["lr"], color="tab:orange")
    axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axis.set_title("learning rate", fontsize=10)


def draw_validation(axis: Axes, log: RunLog, summary: RunSummary) -> None:
    dice = log.columns["val_dice"]
    measured = np.isfinite(dice)
    axis.plot(log.step[measured], dice[measured], marker=".", color="tab:green")
    axis.plot([summary.best_step], [summary.best_val_dice], marker="*", markersize=12, color="tab:red")
    axis.annotate(f"best {summary.best_val_dice:.4f}\nstep {summary.best_step}",
                  (summary.best_step, summary.best_val_dice), textcoords="offset points", xytext=(0, -24),
                  ha="center", fontsize=8, color="tab:red",
                  bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})  # fmt: skip
    axis.set_title("validation mean Dice", fontsize=10)


def draw_step_time(axis: Axes, times: tuple[np.ndarray, np.ndarray], summary: RunSummary) -> None:
    steps, seconds = times
    axis.plot(steps, seconds, color="tab:purple", linewidth=0.8)
    if spans_decades(seconds):  # validation and checkpoint steps are spikes over the training steps
        axis.set_yscale("log")
    axis.set_title(f"step time (median {summary.step_time_s:.3g} s)", fontsize=10)
    axis.set_ylabel("s / step")


def draw_run(run: Path) -> Figure:
    """The figure of ``plot_run``: a row of panels per log (loss, lr, validation Dice, step time: those
    the log has data for)."""
    # A Figure of its own, not pyplot's: no global figure state to close, and no GUI backend chosen.
    from matplotlib.figure import Figure

    logs = read_run(run)
    rows = []
    for log in logs:
        summary, times = summarise(log), step_times(log)
        panels: list[tuple[Callable[..., None], tuple]] = [(draw_loss, (log, summary))]
        if log.column("lr") is not None:
            panels.append((draw_lr, (log,)))
        if summary.best_val_dice is not None:
            panels.append((draw_validation, (log, summary)))
        if times is not None:
            panels.append((draw_step_time, (times, summary)))
        rows.append(panels)
    columns = max(len(panels) for panels in rows)
    figure = Figure(figsize=(4 * columns, 3.2 * len(rows) + 0.4))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for axes_row, panels in zip(axes, rows):
        for axis, (draw, arguments) in zip(axes_row, panels):
            draw(axis, *arguments)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        for axis in axes_row[len(panels) :]:
            axis.axis("off")
    figure.suptitle(f"{run.resolve().name}: {' + '.join(log.kind for log in logs)}")
    figure.tight_layout()
    return figure


def plot_run(run: Path, out: Path | None = None) -> Path:
    """Plot the curves of run folder ``run`` (its pretrain_log.csv and/or finetune_log.csv) to ``out``
    (default: RUN/curves.png), written atomically: a run folder read while training never holds a
    half-written picture."""
    out = Path(run) / "curves.png" if out is None else Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the plot is a PNG: name a .png file")
    figure = draw_run(Path(run))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
        replace_with(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
