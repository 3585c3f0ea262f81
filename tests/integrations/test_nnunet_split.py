"""``maeformer nnunet-split``: few-label fold 0 of nnU-Net's splits_final.json.

Pure JSON and files: runs without nnunetv2, except the dataset id test, which skips without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maeformer_fast.cli.main import main
from maeformer_fast.integrations.nnunet.split import (
    RECORD_FILE,
    SPLITS_FILE,
    few_label_split,
    resolve_dataset_folder,
    training_cases,
)
from maeformer_fast.train.finetune import FinetuneConfig
from maeformer_fast.train.splits import make_splits

CASES = [f"case_{i:02d}" for i in range(10)]
# Worked by hand from Python's random.Random(0).shuffle of the sorted cases:
#   07 08 | 01 05 | 03 04 02 00 09 06
# 20% test = the first round(2.0) = 2, 15% validation = the next round(1.5) = 2, pool = the other 6.
TEST, VAL = ["case_07", "case_08"], ["case_01", "case_05"]
POOL = ["case_00", "case_02", "case_03", "case_04", "case_06", "case_09"]
# The pool, sorted, shuffled by random.Random(0): 06 03 00 02 ... ; fold 0 trains on its first N.
TRAIN_SEED0 = {1: ["case_06"], 2: ["case_03", "case_06"], 4: ["case_00", "case_02", "case_03", "case_06"]}


def nnunet_dataset(root: Path, cases: list[str] = CASES) -> Path:
    """A preprocessed dataset folder as far as the split reads it: dataset.json and gt_segmentations."""
    folder = root / "Dataset123_Toy"
    (folder / "gt_segmentations").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "channel_names": {"0": "CT"}}))
    for case in cases:
        (folder / "gt_segmentations" / f"{case}.nii.gz").write_bytes(b"")
    return folder


def run_split(folder: Path, *args: str) -> int:
    return main(["nnunet-split", "--dataset", str(folder), *args])


def read_folds(folder: Path) -> list[dict[str, list[str]]]:
    return json.loads((folder / SPLITS_FILE).read_text())


def test_fold_zero_is_the_hand_worked_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Fold 0 trains on the hand-worked N cases and validates on the hand-worked fixed set; the record
    keeps the seeds, the test cases and the pool. Mutation seen failing: test and validation slices
    swapped in ``make_splits`` (val = cases[:n_val]); the pool not sorted before its shuffle."""
    folder = nnunet_dataset(tmp_path)
    for labeled, train in TRAIN_SEED0.items():
        assert run_split(folder, "--labeled", str(labeled), "--seed", "0", "--force") == 0
        assert read_folds(folder) == [{"train": train, "val": VAL}]
        record = json.loads((folder / RECORD_FILE).read_text())
        assert (record["test"], record["val"], record["pool"]) == (TEST, VAL, POOL)
        assert (record["labeled"], record["seed"], record["split_seed"], record["cases"]) == (
            labeled,
            0,
            0,
            10,
        )
    out = capsys.readouterr().out
    assert "case_07, case_08" in out and "--split-seed 0" in out  # says where test and validation come from


def test_validation_is_fixed_and_training_cases_come_from_the_pool() -> None:
    """For N in {1, 2, 4} and three seeds: validation and test never change, fold 0 has N training cases,
    all from the pool, nested in those of a larger N for the same seed. Mutation seen failing: the
    validation set drawn with the labeled seed (``split_seed=seed`` in ``few_label_split``)."""
    seen_val, seen_test = set(), set()
    for seed in (0, 1, 2):
        previous: set[str] = set()
        for labeled in (1, 2, 4):
            splits = few_label_split(CASES, labeled, seed)
            seen_val.add(tuple(splits.val))
            seen_test.add(tuple(splits.test))
            assert len(splits.train) == labeled
            assert set(splits.train) <= set(POOL)
            assert previous <= set(splits.train)  # nested
            previous = set(splits.train)
    assert seen_val == {tuple(VAL)} and seen_test == {tuple(TEST)}


def test_fold_zero_equals_maeformer_finetune_split(tmp_path: Path) -> None:
    """The command's defaults give the split ``maeformer finetune`` uses for the same seeds, so nnU-Net and
    maeformer runs compare case for case. Mutation seen failing: ``--val-fraction`` defaulting to 0.2
    (20 cases: 3 validation cases at 15%, 4 at 20%)."""
    cases = [f"case_{i:02d}" for i in range(20)]
    folder = nnunet_dataset(tmp_path, cases)
    assert run_split(folder, "--labeled", "3", "--seed", "5", "--split-seed", "2") == 0
    ours = make_splits(cases, FinetuneConfig.val_fraction, FinetuneConfig.test_fraction, 2, 3, None, 5)
    assert read_folds(folder) == [{"train": ours.train, "val": ours.val}]


def test_same_seed_writes_the_same_file_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Rerunning with the same N and seed leaves splits_final.json untouched. Mutation seen failing: the
    file rewritten even when unchanged (``if changed:`` before the write made ``if True:``)."""
    folder = nnunet_dataset(tmp_path)
    assert run_split(folder, "--labeled", "2", "--seed", "1") == 0
    first = (folder / SPLITS_FILE).read_bytes()
    stamp = (folder / SPLITS_FILE).stat().st_mtime_ns
    assert run_split(folder, "--labeled", "2", "--seed", "1") == 0
    assert (folder / SPLITS_FILE).read_bytes() == first
    assert (folder / SPLITS_FILE).stat().st_mtime_ns == stamp
    assert "unchanged:" in capsys.readouterr().out


def test_refuses_to_overwrite_another_split_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """nnU-Net's own 5-fold file is not replaced without --force; with it, it is kept as .bak1 (then .bak2
    for the next one). Mutations seen failing: the ``force`` check removed; the backup taken after the
    new file is written."""
    folder = nnunet_dataset(tmp_path)
    nnunet_own = json.dumps([{"train": CASES[2:], "val": CASES[:2]}] * 5).encode()
    (folder / SPLITS_FILE).write_bytes(nnunet_own)
    assert run_split(folder, "--labeled", "1") == 2
    error = capsys.readouterr().err
    assert str(folder / SPLITS_FILE) in error and "--force" in error and "5 fold(s)" in error
    assert (folder / SPLITS_FILE).read_bytes() == nnunet_own
    assert not (folder / RECORD_FILE).exists()

    assert run_split(folder, "--labeled", "1", "--force") == 0
    assert (folder / f"{SPLITS_FILE}.bak1").read_bytes() == nnunet_own
    assert read_folds(folder) == [{"train": TRAIN_SEED0[1], "val": VAL}]
    mine = (folder / SPLITS_FILE).read_bytes()
    assert run_split(folder, "--labeled", "2", "--force") == 0
    assert (folder / f"{SPLITS_FILE}.bak2").read_bytes() == mine


def test_training_cases_are_the_labels_nnunet_copied(tmp_path: Path) -> None:
    """Case ids are gt_segmentations' files without dataset.json's file_ending; other files are ignored;
    a folder without them is refused by name. Mutation seen failing: the ending stripped as ``.nii``."""
    folder = nnunet_dataset(tmp_path, ["a_1", "b_2"])
    (folder / "gt_segmentations" / "notes.txt").write_text("")
    assert training_cases(folder) == ["a_1", "b_2"]
    with pytest.raises(FileNotFoundError, match="gt_segmentations"):
        training_cases(tmp_path)


def test_dataset_id_and_name_resolve_with_nnunet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An id or name goes through nnunetv2's resolution under $nnUNet_preprocessed; an unknown id is a
    ValueError (one line on the command line), not nnU-Net's RuntimeError. Mutation seen failing: the
    RuntimeError not converted."""
    pytest.importorskip("nnunetv2", reason="nnunetv2 resolves dataset ids (pip install nnunetv2)")
    folder = nnunet_dataset(tmp_path)
    for name in ("nnUNet_raw", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert resolve_dataset_folder("123") == folder
    assert resolve_dataset_folder("Dataset123_Toy") == folder
    with pytest.raises(ValueError, match="nnU-Net dataset 7"):
        resolve_dataset_folder("7")
