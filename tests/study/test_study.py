"""The data-efficiency study end to end on the phantom dataset, at tiny scale, and its resumability."""

import json
from pathlib import Path

import numpy as np
import pytest

from maeformer_fast.data.cache import open_case
from maeformer_fast.inference.evaluation import predict_case
from maeformer_fast.models.pretrained import load_segmenter
from maeformer_fast.study.common import StudyConfig, checkpoint_every, parse_labeled, steps_to_fraction
from maeformer_fast.study.run import study


def test_parse_labeled_and_steps_to_fraction():
    """Catches a collapsed run counted as converging at once (tried: no check of a target <= 0) and
    an unreached target raising (tried: ``next`` without a default: StopIteration)."""
    assert parse_labeled("4, 16,all") == [4, 16, None]
    with pytest.raises(ValueError, match="--labeled '2,foo': 'foo' is neither"):  # named, not int()'s words
        parse_labeled("2,foo")
    assert steps_to_fraction([(10, 0.2), (20, 0.58), (30, 0.6), (40, 0.5)]) == 20
    assert steps_to_fraction([]) is None
    assert steps_to_fraction([(10, 0.5), (20, 0.9), (30, 0.52)]) == 10  # of the last Dice by default
    # Against a given target (the converged protocol: the best Dice, 0.9 -> 0.855): step 20, not 10.
    assert steps_to_fraction([(10, 0.5), (20, 0.9), (30, 0.52)], target=0.9) == 20
    # A target the curve never reaches, and a collapsed run (target 0, every point "reaches" it).
    assert steps_to_fraction([(10, 0.5), (20, 0.6)], target=0.8) is None
    assert steps_to_fraction([(10, 0.0), (20, 0.0)]) is None
    # a quarter of the maximum, at most 500 steps (a 24,000-step scratch maximum: 500, not 6,000)
    assert [checkpoint_every(n) for n in (24_000, 4_000, 200, 3)] == [500, 500, 50, 1]


def recomputed_test_dice(folder: Path, cache: Path, cases: list[str] | None = None) -> float:
    """Mean over classes and test cases of 2|P & R| / (|P| + |R|) (1 when both are empty), counted
    here from the arm's best model's predictions on ``cases`` of ``cache`` (default: its test split)."""
    model, plan, _ = load_segmenter(folder / "model.safetensors")
    scores = []
    for case in cases or json.loads((folder / "splits.json").read_text())["test"]:
        image, label = open_case(cache, case, labeled=True)
        predicted = predict_case(model, image, model.config.crop_size, plan["num_classes"], "cpu", "fp32")
        for c in range(1, plan["num_classes"]):
            p, r = predicted == c, np.asarray(label) == c
            total = np.count_nonzero(p) + np.count_nonzero(r)
            scores.append(1.0 if total == 0 else 2 * np.count_nonzero(p & r) / total)
    return float(np.mean(scores))


def test_study_end_to_end_and_resume(phantom_cache, tmp_path, capsys):
    """Catches a test Dice that is not the best model's on the test split (tried: the classes'
    mean taken as their maximum in ``summarise``)."""
    config = StudyConfig(
        data=str(phantom_cache), out=str(tmp_path / "study"), labeled="2", seeds=1, pretrain_steps=2,
        finetune_steps=2, val_every=1, max_val_cases=1, num_workers=0, val_fraction=0.1, test_fraction=0.1,
        model_overrides={"embed_dim": 8, "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)},
    )  # fmt: skip
    result = study(config)
    assert [r["arm"] for r in result.rows] == ["mae", "scratch", "scratch_matched"]
    assert [r["steps"] for r in result.rows] == [2, 2, 4]
    assert all(r["labeled"] == 2 for r in result.rows)
    for row in result.rows:  # the reported test Dice, recomputed here from each arm's best model
        folder = tmp_path / "study" / "runs" / "labeled-2" / "seed-0" / row["arm"]
        expected = recomputed_test_dice(folder, phantom_cache)
        assert row["test_dice_mean"] == pytest.approx(expected, abs=1e-9), row["arm"]
    for path in result.files.values():
        assert path.is_file() and path.stat().st_size > 0
    report = result.files["report"].read_text()
    assert "mae - scratch_matched" in report and "scratch_matched" in report
    # the pretraining saw every cache case except the test split
    plan = json.loads((tmp_path / "study" / "pretrain_data" / "plan.json").read_text())
    test_cases = set(
        json.loads((tmp_path / "study/runs/labeled-2/seed-0/mae/splits.json").read_text())["test"]
    )
    assert test_cases and not test_cases & {c["id"] for c in plan["cases"]}
    assert result.pretrain["cases"] == 16 - len(test_cases)

    capsys.readouterr()
    again = study(config)  # every arm finished: nothing is trained again
    assert "study: " not in capsys.readouterr().out
    assert again.rows == result.rows

    # report-only: the tables are rebuilt from the finished arms' result files alone
    report_dir = tmp_path / "report"
    rebuilt = study(StudyConfig(data="unused", out=config.out, report_dir=str(report_dir), report_only=True))
    assert rebuilt.rows == result.rows
    assert (report_dir / "results.csv").read_text() == result.files["table_csv"].read_text()


def test_only_arm_keeps_one_seed_and_arm_at_every_count():
    """``--only-arm SEED:ARM`` (what run.sh's BY_ARM=1 runs, one process per arm): the run order
    reduced to that (seed, arm) at each labeled count, in the full order's count order; a seed or arm
    outside the study is refused. Hand-written orders. Mutations caught: filtering on the arm only
    (seeds 0 and 1 both kept); the seed bound ``>`` instead of ``>=`` (seed 2 of 2 accepted)."""
    from maeformer_fast.study.common import arm_order

    full = arm_order(2, [1, None], ["mae", "scratch"])
    assert full == [(0, 1, "mae"), (0, 1, "scratch"), (0, None, "mae"), (0, None, "scratch"),
                    (1, 1, "mae"), (1, 1, "scratch"), (1, None, "mae"), (1, None, "scratch")]  # fmt: skip
    assert arm_order(2, [1, None], ["mae", "scratch"], "1:scratch") == [
        (1, 1, "scratch"),
        (1, None, "scratch"),
    ]
    for bad in ("2:mae", "0:mae_short", "mae", "x:mae"):
        with pytest.raises(ValueError, match="--only-arm"):
            arm_order(2, [1, None], ["mae", "scratch"], bad)


def test_a_finished_pretraining_is_found_in_the_study_folder_it_was_moved_to(tmp_path):
    """A study folder copied elsewhere (restore.sh with another OUT) reuses its finished pretraining:
    the returned encoder is the one in this folder, whatever the record names (records of 2026-11
    name it from the old working directory, newer ones relative to their own folder). Mutation
    caught: returning the record's ``encoder_path`` as written (a path that does not exist here)."""
    from maeformer_fast.study.common import run_pretraining

    for recorded in (
        "runs/hippocampus_study_converged/pretrain/p/encoder.safetensors",
        "encoder.safetensors",
    ):
        folder = tmp_path / recorded.replace("/", "_") / "pretrain" / "p"
        folder.mkdir(parents=True)
        (folder / "encoder.safetensors").write_bytes(b"weights")
        (folder / "pretrain.json").write_text(json.dumps({"encoder_path": recorded, "steps": 3}))
        config = StudyConfig(data="unused", out=str(folder.parents[1]))
        record = run_pretraining(config, folder, Path("unused"), 3, {})
        assert Path(record["encoder_path"]).read_bytes() == b"weights"
        assert record["steps"] == 3
