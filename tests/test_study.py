"""The data-efficiency study end to end on the phantom dataset, at tiny scale, and its resumability."""

import json

from maeformer_fast.train.study import StudyConfig, parse_labeled, steps_to_fraction, study


def test_parse_labeled_and_steps_to_fraction():
    assert parse_labeled("4, 16,all") == [4, 16, None]
    assert steps_to_fraction([(10, 0.2), (20, 0.58), (30, 0.6), (40, 0.5)]) == 20
    assert steps_to_fraction([]) is None
    assert steps_to_fraction([(10, 0.5), (20, 0.9), (30, 0.52)]) == 10  # of the final Dice, not the best


def test_study_end_to_end_and_resume(phantom_cache, tmp_path, capsys):
    config = StudyConfig(
        data=str(phantom_cache), out=str(tmp_path / "study"), labeled="2", seeds=1, pretrain_steps=2,
        finetune_steps=2, val_every=1, max_val_cases=1, num_workers=0, val_fraction=0.1, test_fraction=0.1,
        model_overrides={"embed_dim": 8, "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)},
    )  # fmt: skip
    result = study(config)
    assert [r["arm"] for r in result.rows] == ["mae", "scratch", "scratch_matched"]
    assert [r["steps"] for r in result.rows] == [2, 2, 4]
    assert all(r["labeled"] == 2 and 0 <= r["test_dice_mean"] <= 1 for r in result.rows)
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
