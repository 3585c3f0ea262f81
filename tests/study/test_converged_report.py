"""The converged report while scratch's arms are rerun with a re-tuned recipe: the first recipe's arms
(under ``OUT/superseded/scratch_lr-0.005``) read as their own arm beside the new ones, the effects of
both comparisons, how many new arms have finished, and the tuning budgets behind each recipe. Small
hand-written records: labeled 1 and 2 x seeds 0 and 1, the new scratch arm of (2, seed 1) unfinished."""

import csv
import json
from pathlib import Path

import pytest

from maeformer_fast.study.common import StudyConfig
from maeformer_fast.study.converged_report import (
    OLD_SCRATCH,
    SUPERSEDED_SCRATCH,
    scratch_recipes,
    scratch_tuning,
    validation_baseline,
)
from maeformer_fast.study.run import study

# Test Dice per (arm, labeled) at seeds 0, 1; None: that arm has not finished.
DICE = {
    ("mae", 1): (0.70, 0.80),
    ("mae", 2): (0.85, 0.90),
    ("scratch", 1): (0.65, 0.70),
    ("scratch", 2): (0.80, None),
    ("old", 1): (0.60, 0.78),
    ("old", 2): (0.70, 0.95),
}
FIRST = {"lr_schedule": "constant", "warmup_steps": 1000}  # the first search's knobs: no weight decay
NEW = {"lr_schedule": "constant", "lr": 0.02, "warmup_steps": 1000, "weight_decay": 0.01}
# (name, stage, recipe, best validation Dice): two runs of each scratch search
TRIALS = [
    ("mae_pretext", "pretext", {}, 0.75),
    ("mae_lr-0.001", "mae_recipe", {"lr": 0.001}, 0.76),
    ("mae_lr-0.003", "mae_recipe", {"lr": 0.003}, 0.78),
    ("scratch_lr-0.001", "scratch_lr", {**FIRST, "lr": 0.001}, 0.77),
    ("scratch_lr-0.005", "scratch_lr", {**FIRST, "lr": 0.005}, 0.79),
    ("scratch_lr-0.02", "scratch_lr", NEW, 0.804),
    ("scratch_lr-0.02_wd-0.05", "scratch_recipe", {**NEW, "weight_decay": 0.05}, 0.745),
]


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def arm_record(arm: str, labeled: int, seed: int, dice: float, **extra: object) -> dict:
    """A finished arm's result.json, test Dice ``dice``, the rest made up."""
    return {"arm": arm, "labeled": labeled, "seed": seed, "steps": 300, "max_steps": 8000,
            "test_dice_mean": dice, "best_val_dice": dice + 0.05, "best_step": 200, "wall_time_s": 10.0,
            "curve": [[100, dice], [200, dice + 0.05], [300, dice]], "val_cases": 2, "test_cases": 4,
            **extra}  # fmt: skip


@pytest.fixture
def study_folder(tmp_path: Path) -> Path:
    """A converged study's work folder: choices, FLOPs, two pretrainings, the tuning runs (as the work
    folder lists them: every run in tuning.json, each with its own record) and the arms of ``DICE``,
    the old scratch ones under ``SUPERSEDED_SCRATCH``."""
    out = tmp_path / "study"
    write_json(out / "choices.json", {
        "encoder_stages": 3, "mask_ratio": 0.6, "mask_units": 96, "mae_recipe": {"lr": 0.003},
        "scratch_lr": 0.02, "scratch_recipe": NEW, "scratch_max_steps": 28000, "short_steps": 10,
    })  # fmt: skip
    write_json(out / "flops.json", {"stages-3_mask-0.6": {
        "pretrain_step": 1e9, "finetune_step": 2e9, "batch_size": 2, "crop": [8, 8, 8], "counted_on": "cpu",
    }})  # fmt: skip
    for steps in (100, 10):
        folder = out / "pretrain" / f"stages-3_mask-0.6_steps-{steps}"
        record = {"steps": steps, "wall_time_s": 5.0, "final_loss": 0.5, "flattening": {"relative_drop": 0.0}}
        write_json(folder / "pretrain.json", record)
        (folder / "pretrain_log.csv").write_text(
            f"step,loss,lr,voxels_per_s,elapsed_s\n{steps},0.5,0,0,5.0\n"
        )
    trials = []
    for name, stage, recipe, dice in TRIALS:
        trials.append({"stage": stage, "name": name, **recipe, "best_val_dice": dice, "best_step": 100,
                       "steps": 200, "wall_time_s": 1.0})  # fmt: skip
        write_json(out / "tuning" / name / "result.json", {
            **arm_record("tuning", 2, 100, dice), "recipe": recipe,
        })  # fmt: skip
    write_json(out / "tuning.json", trials)
    for (arm, labeled), values in DICE.items():
        for seed, dice in enumerate(values):
            if dice is None:
                continue
            if arm == "old":  # as the rerun left them: the records still say scratch
                folder = out / SUPERSEDED_SCRATCH / "runs"
                record = arm_record("scratch", labeled, seed, dice, recipe={**FIRST, "lr": 0.005})
            else:
                folder, record = out / "runs", arm_record(arm, labeled, seed, dice)
            write_json(folder / f"labeled-{labeled}" / f"seed-{seed}" / arm.replace("old", "scratch") /
                       "result.json", record)  # fmt: skip
    return out


def report(out: Path, tmp_path: Path):
    """``maeformer study --protocol converged --report-only`` of ``out``, into ``tmp_path/report``."""
    config = StudyConfig(data="unused", out=str(out), protocol="converged", report_only=True,
                         report_dir=str(tmp_path / "report"), pretrain_steps=100)  # fmt: skip
    return study(config)


def test_old_and_new_scratch_arms_side_by_side(study_folder, tmp_path):
    """Effects by hand, paired by seed (t(0.975, 1) = 12.706):
    labeled 1, ``mae - scratch`` 0.05, 0.10: mean +0.075, s/sqrt(2) = 0.025, [-0.243, +0.393];
    ``mae - scratch_lr5e-3`` 0.10, 0.02: +0.060, s/sqrt(2) = 0.04, [-0.448, +0.568];
    labeled 2, ``mae - scratch`` seed 0 alone (seed 1's new arm unfinished): +0.050, no interval;
    ``mae - scratch_lr5e-3`` 0.15, -0.05: +0.050, s/sqrt(2) = 0.1, [-1.221, +1.321], better on 1 of 2.
    Mutations caught: the old arms read under their recorded name ``scratch`` (no ``mae -
    scratch_lr5e-3``, and they take the new arms' places); the old arms not added to the rows; the
    unpaired seed included (tried: differences shifted to the difference of the arms' means over all
    their seeds: labeled 2 ``mae - scratch`` +0.075); the finished count over every scratch-like arm
    (tried: ``startswith("scratch")``: "7 of 4") or out of the new arm's own cells (tried: "3 of 3");
    the seed count left out of a cell over fewer seeds (tried: ``fewer = False``)."""
    result = report(study_folder, tmp_path)
    effects = json.loads(result.files["effects"].read_text())
    dice = {(e["comparison"], e["labeled"]): e for e in effects if e["metric"] == "test_dice_mean"}
    expected = {
        ("mae - scratch", 1): (0.075, 2, 2, -0.243, 0.393),
        ("mae - scratch", 2): (0.050, 1, 1, None, None),
        ("mae - scratch_lr5e-3", 1): (0.060, 2, 2, -0.448, 0.568),
        ("mae - scratch_lr5e-3", 2): (0.050, 2, 1, -1.221, 1.321),
    }
    assert set(dice) == set(expected)  # no mae_short arm: no comparison with it
    for key, (mean, seeds, wins, low, high) in expected.items():
        e = dice[key]
        assert (e["mean_diff"], e["n_seeds"], e["wins"]) == (pytest.approx(mean), seeds, wins), key
        assert (e["t_low"], e["t_high"]) == (
            (None, None) if low is None else (pytest.approx(low, abs=5e-4), pytest.approx(high, abs=5e-4))
        ), key

    with open(result.files["table_csv"]) as f:
        rows = [(r["arm"], r["labeled"], r["seed"], r["test_dice_mean"]) for r in csv.DictReader(f)]
    # the study's rows by seed then labeled count, then the old arms, marked by their arm name
    assert rows[-4:] == [(OLD_SCRATCH, "1", "0", "0.6"), (OLD_SCRATCH, "2", "0", "0.7"),
                         (OLD_SCRATCH, "1", "1", "0.78"), (OLD_SCRATCH, "2", "1", "0.95")]  # fmt: skip
    assert sorted(r[0] for r in rows[:-4]) == ["mae"] * 4 + ["scratch"] * 3
    runs = json.loads(result.files["table_json"].read_text())["runs"]
    assert [r["recipe"]["lr"] for r in runs if r["arm"] == OLD_SCRATCH] == [0.005] * 4

    text = result.files["report"].read_text()
    assert "scratch (re-tuned recipe): 3 of 4 arms finished." in text
    # best validation Dice = test Dice + 0.05 (arm_record): labeled 1 scratch 0.725, old (0.65 + 0.83) / 2;
    # labeled 2 scratch seed 0 alone 0.85, old (0.75 + 1.00) / 2
    assert (
        "per labeled count (the stronger baseline, chosen without the test split): "
        f"1 `{OLD_SCRATCH}` (0.740 against 0.725); 2 `{OLD_SCRATCH}` (0.875 against 0.850)." in text
    )
    table = text[text.index("| labeled | mae |") :].splitlines()[:4]
    assert table[0] == (
        "| labeled | mae | mae_short | scratch | scratch, first recipe (lr 0.005) | "
        "mae - scratch | mae_short - scratch | mae - mae_short | mae - scratch_lr5e-3 |"
    )
    assert table[2] == (
        "| 1 | 0.750 ± 0.071 | n/a | 0.675 ± 0.035 | 0.690 ± 0.127 | +0.075 [-0.243, +0.393] (2 of 2) | "
        "n/a | n/a | +0.060 [-0.448, +0.568] (2 of 2) |"
    )
    assert table[3] == (
        "| 2 | 0.875 ± 0.035 | n/a | 0.800 (1 of 2 seeds) | 0.825 ± 0.177 | +0.050 (1 of 1) | n/a | n/a | "
        "+0.050 [-1.221, +1.321] (1 of 2) |"
    )
    assert "| 2 | scratch_lr5e-3 | 2 | 0.825 ± 0.177 |" in text  # the arms table


@pytest.mark.parametrize("split_lists", [False, True], ids=["one tuning.json", "scratch_search_tuning.json"])
def test_tuning_budgets_of_both_scratch_recipes(study_folder, split_lists):
    """The protocol's sentence on tuning budgets, from the records: MAE 3 runs, scratch 4 (2 of the
    first search, whose records name no weight decay, and 2 more), each recipe with its run's
    validation Dice. Either way the records list the runs: all in tuning.json (the work folder), or
    tuning.json holding the first search's and scratch_search_tuning.json every run (the committed
    records before the rerun). Mutations caught: scratch_search_tuning.json not read (2 scratch runs,
    "{0.001, 0.005}"); the first search counted as the ``scratch_lr`` stage (3 runs: the later search's
    lr runs share that stage); the MAE side's runs counted over every stage (7 runs); without the runs'
    own records, a first search named anyway (tried: its clause always: "0 in a first search")."""
    trials = json.loads((study_folder / "tuning.json").read_text())
    if split_lists:
        (study_folder / "scratch_search_tuning.json").write_text(json.dumps(trials))
        (study_folder / "tuning.json").write_text(json.dumps(trials[:5]))
        trials = trials[:5]
    choices = json.loads((study_folder / "choices.json").read_text())
    tuning = scratch_tuning(study_folder, trials, choices, {**FIRST, "lr": 0.005})
    assert (tuning["first_search_runs"], tuning["scratch_runs"]) == (2, 4)
    assert scratch_recipes(tuning, StudyConfig(data="", out="")) == (
        "Tuning budgets (validation Dice only; labeled 2, seed 100): the MAE recipe came from 3 runs "
        "(1 pretext, 2 mae_recipe), scratch's from 4 (lr {0.001, 0.005, 0.02}, warmup {1000}, weight decay "
        "{0.01, 0.05}): 2 in a first search over learning rates alone, whose choice (lr 0.005, warmup 1000; "
        "validation Dice 0.790) the superseded arms `scratch_lr5e-3` ran with, and 2 more in a second. "
        "`scratch` runs the recipe chosen from all of them: lr 0.02, warmup 1000, weight decay 0.01; "
        "validation Dice 0.804."
    )
    # without the runs' own records the first search is not told apart: the old recipe alone is named
    for record in study_folder.glob("tuning/*/result.json"):
        record.unlink()
    tuning = scratch_tuning(study_folder, trials, choices, {**FIRST, "lr": 0.005})
    assert (
        ": the superseded arms `scratch_lr5e-3` ran with lr 0.005, warmup 1000; validation Dice 0.790. "
        in (scratch_recipes(tuning, StudyConfig(data="", out="")))
    )


def test_without_superseded_arms_the_report_is_as_before(study_folder, tmp_path):
    """No superseded folder (the study before its rerun): three arms' columns, the three comparisons,
    no seed counts in the cells even where scratch has fewer seeds, no tuning-budget sentence, no rerun
    count, no record of the scratch tuning. Mutations caught: the old arm's column always shown (tried:
    ``rerun = True``: "n/a" under it); the seed counts shown without a rerun (tried: ``fewer`` without
    ``rerun``: "0.800 (1 of 2 seeds)")."""
    for path in sorted((study_folder / SUPERSEDED_SCRATCH).rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    result = report(study_folder, tmp_path)
    text = result.files["report"].read_text()
    table = text[text.index("| labeled | mae |") :].splitlines()[:4]
    assert (
        table[0]
        == "| labeled | mae | mae_short | scratch | mae - scratch | mae_short - scratch | mae - mae_short |"
    )
    assert table[3] == "| 2 | 0.875 ± 0.035 | n/a | 0.800 | +0.050 (1 of 1) | n/a | n/a |"
    assert "Tuning budgets" not in text and "re-tuned recipe" not in text and OLD_SCRATCH not in text
    assert "scratch_tuning" not in json.loads(result.files["record"].read_text())
    assert {e["comparison"] for e in json.loads(result.files["effects"].read_text())} == {"mae - scratch"}


def test_validation_baseline_picks_the_higher_mean_best_validation_dice():
    """Hand-made summary: at 1 labeled case the re-tuned recipe validated higher (0.70 > 0.68), at 2
    the first one (0.85 > 0.80); 4 has no scratch arms and is left out. Mutations caught: the lower
    one picked (tried: ``new < old``), the first recipe always named (tried: ``arm = OLD_SCRATCH``),
    a count without both recipes listed (tried: no ``continue``: TypeError on None)."""
    summary = [
        {"labeled": 1, "arm": "scratch", "best_val_dice": (0.70, 0.01)},
        {"labeled": 1, "arm": OLD_SCRATCH, "best_val_dice": (0.68, 0.02)},
        {"labeled": 2, "arm": "scratch", "best_val_dice": (0.80, 0.01)},
        {"labeled": 2, "arm": OLD_SCRATCH, "best_val_dice": (0.85, 0.02)},
        {"labeled": 4, "arm": "mae", "best_val_dice": (0.90, 0.01)},
    ]
    assert validation_baseline(summary).endswith(
        f"1 `scratch` (0.700 against 0.680); 2 `{OLD_SCRATCH}` (0.850 against 0.800)."
    )
