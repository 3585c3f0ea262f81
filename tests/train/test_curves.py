"""plot_run and the numbers it annotates, on hand-written CSV logs with hand-worked answers."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from maeformer_fast.train.curves import draw_run, plot_run, read_log, read_run, running_mean, summarise

# Validation at steps 2, 4, 6, with a tie of the best (0.7) at 4 and 6; step 4 took 2.5 s (a
# validation), the others 0.5 s; the loss falls 20x. The last line is half-written (no newline), as a
# log being written can end: not a step.
FINETUNE_LOG = """step,loss,lr,val_dice,elapsed_s
1,2.0,1.000e-04,,0.50
2,1.0,2.000e-04,0.4000,1.00
3,0.5,3.000e-04,,1.50
4,0.25,4.000e-04,0.7000,4.00
5,0.2,5.000e-04,,4.50
6,0.1,5.000e-04,0.7000,5.00
7,0.0"""

# A row every 10 steps (--log-every 10): 1 s then 2 s per row, so 0.1 and 0.2 s per step.
PRETRAIN_LOG = """step,loss,lr,voxels_per_s,elapsed_s
10,1.0,1.000e-04,100.0,1.00
20,0.95,2.000e-04,100.0,2.00
30,0.9,3.000e-04,100.0,4.00
"""


def make_run(folder: Path, pretrain: bool = True, finetune: bool = True) -> Path:
    folder.mkdir(parents=True)
    if pretrain:
        (folder / "pretrain_log.csv").write_text(PRETRAIN_LOG)
    if finetune:
        (folder / "finetune_log.csv").write_text(FINETUNE_LOG)
    return folder


def test_summary_of_a_finetune_log(tmp_path):
    """Best validation 0.7 at step 4, the earlier of the tie (fine-tuning keeps that model), final loss
    0.1 at step 6 (the half-written line left out), median 0.5 s per step despite the slow validation
    step. Catches the latest of a tie (tried: argmax over the reversed column), the half-written line
    read (tried: ``csv.DictReader`` on the file instead of ``complete_rows``) and the mean step time
    (tried: ``np.mean``, 0.9 s)."""
    run = make_run(tmp_path / "run", pretrain=False)
    summary = summarise(read_log(run / "finetune_log.csv", "finetune"))
    assert (summary.best_val_dice, summary.best_step) == (0.7, 4)
    assert (summary.last_step, summary.final_loss, summary.step_time_s) == (6, 0.1, 0.5)
    assert (
        summary.describe() == "finetune: 6 steps, final loss 0.1, best val Dice 0.7000 at step 4, 0.5 s/step"
    )


def test_summary_of_a_pretrain_log_counts_seconds_per_step(tmp_path):
    """Rows 10 steps apart: 0.1 and 0.2 s per step, median 0.15; no validation. Catches the seconds
    per row taken as per step (tried: no division by the step difference, 1.5 s)."""
    run = make_run(tmp_path / "run", finetune=False)
    (log,) = read_run(run)
    summary = summarise(log)
    assert summary.kind == "pretrain" and summary.best_val_dice is None and summary.best_step is None
    assert summary.step_time_s == pytest.approx(0.15)
    assert summary.describe() == "pretrain: 30 steps, final loss 0.9, 0.15 s/step"


def test_running_mean_is_trailing():
    """Each value with the one before it (the first alone). Catches a division by the full window at
    the start (tried: ``/ window``: 0.5 first) and a window one too long (tried: ``ends - window - 1``)."""
    np.testing.assert_allclose(running_mean(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 2), [1, 1.5, 2.5, 3.5, 4.5])


def panel(figure: Figure, title_start: str):
    (axis,) = [axis for axis in figure.axes if axis.get_title().startswith(title_start)]
    return axis


def test_plot_run_writes_both_logs_and_marks_the_best(tmp_path):
    """Both logs: two rows of four panels, 1600x680 pixels at RUN/curves.png, no temporary file left.
    The fine-tuning loss (20x) on a log axis, the pretraining loss (1.1x) not; the validation panel
    plots the three validations only and marks 0.7 at step 4. Catches the log axis always chosen
    (tried: the ``spans_decades`` test as ``> 1.0 *``) or never (tried: ``set_yscale`` removed), empty
    val_dice read as 0 (tried: ``float(row[n] or 0)``), the best marked at the last validation (tried:
    ``log.step[-1]``) and another default name (tried: ``plot.png``)."""
    run = make_run(tmp_path / "run")
    path = plot_run(run)
    assert path == run / "curves.png"
    assert matplotlib.image.imread(path).shape == (680, 1600, 4)
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "finetune_log.csv", "pretrain_log.csv"]

    figure = draw_run(run)
    assert figure.get_suptitle() == "run: pretrain + finetune"
    assert panel(figure, "pretrain loss").get_yscale() == "linear"
    assert panel(figure, "finetune loss").get_yscale() == "log"
    validation = panel(figure, "validation")
    (line, best) = validation.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [2, 4, 6])
    np.testing.assert_array_equal(line.get_ydata(), [0.4, 0.7, 0.7])
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([4], [0.7])
    assert [text.get_text() for text in validation.texts] == ["best 0.7000\nstep 4"]


def test_plot_run_keeps_the_old_picture_when_writing_fails(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous picture whole and no temporary file. Catches
    a direct write to the output (tried: ``savefig(out)`` in place of the temporary file) and a
    temporary file left behind (tried: no ``unlink``)."""
    run = make_run(tmp_path / "run")
    out = tmp_path / "pictures" / "curves.png"
    out.parent.mkdir()
    out.write_bytes(b"previous picture")

    def failing_savefig(figure, target, **kwargs):
        if isinstance(target, Path):  # a file name: the mutation that writes the output directly
            target.write_bytes(b"half")
        else:
            target.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_run(run, out)
    assert out.read_bytes() == b"previous picture"
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]


def test_errors_name_the_problem(tmp_path):
    """A missing folder, a folder without either log (both names said), a header-only log, a row
    that is not numbers and an output that is not a PNG: each a one-line error naming it. Catches the
    folder check dropped (tried: the ``is_dir`` test removed, which says "no training log" instead)
    and the header-only check dropped (tried: an IndexError instead)."""
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such run folder"):
        plot_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no training log: looked for pretrain_log.csv and finetune_log"
    ):
        plot_run(tmp_path / "empty")
    started = make_run(tmp_path / "started", pretrain=False)
    (started / "finetune_log.csv").write_text("step,loss,lr,val_dice,elapsed_s\n")
    with pytest.raises(ValueError, match=r"finetune_log.csv: the log has no steps yet \(header only\)"):
        plot_run(started)
    (started / "finetune_log.csv").write_text("step,loss\n1,diverged\n")
    with pytest.raises(ValueError, match=r"finetune_log.csv: a row that is not numbers"):
        plot_run(started)
    (started / "finetune_log.csv").write_text("epoch,accuracy\n1,0.5\n")
    with pytest.raises(ValueError, match=r"not a training log: no step or loss column \(header: epoch, acc"):
        plot_run(started)
    with pytest.raises(ValueError, match=r"curves.jpg: the plot is a PNG"):
        plot_run(make_run(tmp_path / "run"), tmp_path / "curves.jpg")
