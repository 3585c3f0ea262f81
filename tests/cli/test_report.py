"""``maeformer report``: the subcommand that ``register`` adds, parsed and run as ``main`` runs it."""

from __future__ import annotations

import argparse

import matplotlib.image
import pytest

from maeformer_fast.cli.report import register

LOG = """step,loss,lr,val_dice,elapsed_s
1,1.0,1.000e-04,,0.50
2,0.5,1.000e-04,0.2500,1.50
"""


def run_report(argv: list[str]) -> int:
    """Parse ``argv`` with a parser like ``maeformer``'s and call the command's ``func``."""
    parser = argparse.ArgumentParser(prog="maeformer")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_report_writes_the_picture_and_says_where(tmp_path, capsys):
    """Default output RUN/curves.png, then --out: the path printed is the file written, after the
    log's summary line. Catches --out ignored (tried: ``plot_run(args.run)``)."""
    run = tmp_path / "finetune-run"
    run.mkdir()
    (run / "finetune_log.csv").write_text(LOG)
    assert run_report(["report", str(run)]) == 0
    assert (run / "curves.png").is_file()
    out = tmp_path / "pictures" / "ft.png"
    assert run_report(["report", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = "finetune: 2 steps, final loss 0.5, best val Dice 0.2500 at step 2, 1 s/step"
    assert printed == [summary, f"wrote {run / 'curves.png'}", summary, f"wrote {out}"]
    assert matplotlib.image.imread(out).shape == (360, 1600, 4)


def test_report_of_a_folder_without_logs_fails_with_the_files_it_looked_for(tmp_path):
    """The error ``main`` prints as one line (a FileNotFoundError), naming both log files."""
    with pytest.raises(FileNotFoundError, match="looked for pretrain_log.csv and finetune_log.csv"):
        run_report(["report", str(tmp_path)])
