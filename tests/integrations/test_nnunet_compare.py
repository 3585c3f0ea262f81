"""``maeformer nnunet-compare``: nnU-Net validation summaries side by side, on summaries written by
hand (nnU-Net's own layout and the records layout of results/nnunet_hippocampus/run.sh), with the
expected numbers worked out by hand. No nnunetv2 needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maeformer_fast.cli.main import main
from maeformer_fast.integrations.nnunet.compare import comparison_markdown, find_results


def write_summary(path: Path, dice_1: float, dice_2: float, foreground: float) -> None:
    """A summary.json shaped as nnU-Net's (only the fields read, plus one it writes that is not)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "foreground_mean": {"Dice": foreground, "IoU": 0.0},
        "mean": {"1": {"Dice": dice_1}, "2": {"Dice": dice_2}},
        "metric_per_case": [],
    }
    path.write_text(json.dumps(summary))


def test_tables_pair_runs_by_their_path_and_match_hand_computed_values(tmp_path: Path) -> None:
    """Trainer A in seeds 0 and 1, trainer B in seeds 0, 1 and 2 (seed 2 unpaired). By hand: A's
    foreground mean 0.650 ± 0.071 (sample sd of 0.7 and 0.6), B's 0.700 ± 0.173 (sd of 0.8, 0.8, 0.5:
    sqrt(0.06 / 2)); B - A over seeds 0 and 1: differences 0.1 and 0.2, +0.150 ± 0.071, B higher in 2
    of 2; class 1 of A: 0.550 ± 0.071. Mutations seen failing: the population sd (A's 0.050); the
    difference taken first - second (-0.150); the trainer named with its plans suffix (three trainers)."""
    records = tmp_path / "records"
    write_summary(records / "seed-0/nnUNetTrainer_A/summary.json", 0.6, 0.8, 0.7)
    write_summary(records / "seed-1/nnUNetTrainer_A/summary.json", 0.5, 0.7, 0.6)
    write_summary(records / "seed-0/nnUNetTrainer_B__nnUNetPlans__3d_fullres/summary.json", 0.7, 0.9, 0.8)
    write_summary(records / "seed-1/nnUNetTrainer_B/summary.json", 0.8, 0.8, 0.8)
    write_summary(records / "seed-2/nnUNetTrainer_B/summary.json", 0.4, 0.6, 0.5)

    results = find_results(records)
    assert [(r.trainer, r.run) for r in results] == [
        ("nnUNetTrainer_A", "seed-0"), ("nnUNetTrainer_A", "seed-1"),
        ("nnUNetTrainer_B", "seed-0"), ("nnUNetTrainer_B", "seed-1"), ("nnUNetTrainer_B", "seed-2"),
    ]  # fmt: skip
    text = comparison_markdown(results)
    assert "| nnUNetTrainer_A | 2 | 0.550 ± 0.071 | 0.750 ± 0.071 | 0.650 ± 0.071 |" in text
    assert "| nnUNetTrainer_B | 3 | 0.633 ± 0.208 | 0.767 ± 0.153 | 0.700 ± 0.173 |" in text
    assert "| seed-2 | 0.500 |  |" in text  # B (higher mean) first; A has no seed 2
    assert "| nnUNetTrainer_B - nnUNetTrainer_A | 2 | +0.150 ± 0.071 | 2 / 2 |" in text


def test_nnunet_results_layout_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """In nnU-Net's own results layout the fold path is the run; the command prints the tables and
    writes --out; a summary under no trainer folder and a folder without summaries end with one line
    naming the path; the higher-scoring trainer comes first though its name sorts last. Mutations seen
    failing: the run including the trainer folder (no pairs); trainers in name order (-0.250)."""
    results = tmp_path / "nnUNet_results" / "Dataset004_Hippocampus"
    for trainer, value in (("nnUNetTrainer_500it", 0.5), ("nnUNetTrainer_nnFormer_500it", 0.75)):
        write_summary(results / f"{trainer}__nnUNetPlans__3d_fullres/fold_0/validation/summary.json",
                      value, value, value)  # fmt: skip
    out = tmp_path / "compare.md"
    assert main(["nnunet-compare", str(tmp_path / "nnUNet_results"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert "| Dataset004_Hippocampus/fold_0/validation | 0.750 | 0.500 |" in printed
    assert "| nnUNetTrainer_nnFormer_500it - nnUNetTrainer_500it | 1 | +0.250 | 1 / 1 |" in printed

    stray = tmp_path / "stray" / "summary.json"
    write_summary(stray, 0.1, 0.1, 0.1)
    assert main(["nnunet-compare", str(tmp_path / "stray")]) == 2
    assert f"{stray}: no folder of its path" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["nnunet-compare", str(tmp_path / "empty")]) == 2
    assert "no nnU-Net validation summary.json" in capsys.readouterr().err
