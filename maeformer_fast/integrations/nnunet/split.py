"""Few-label training inside nnU-Net v2: a ``splits_final.json`` whose fold 0 trains on N labeled cases.

nnU-Net reads ``$nnUNet_preprocessed/<dataset>/splits_final.json`` (a list of folds, each
``{"train": [...], "val": [...]}``) when it trains a fold, for every plans and configuration of the
dataset. The fold written here is maeformer's own split (``train.splits.make_splits``) of the dataset's
training cases, with the defaults of ``maeformer finetune``:

- test (20%) and validation (15%) cases are drawn by ``split_seed`` alone, so they are the same for every
  N and seed and the Dice values of all runs compare; the test cases are in no fold;
- the training pool is the rest; fold 0 trains on the first N cases of the pool shuffled by ``seed``,
  so for one seed smaller N are nested in larger ones.

For the same case identifiers and seeds, fold 0 is therefore exactly the split ``maeformer finetune
--labeled N --seed S --split-seed K`` trains and validates on: nnU-Net and maeformer runs compare case
for case. Only fold 0 is written: nnU-Net trains other folds on its own random 80:20 split, which would
mix test cases into training.

Pure JSON and file work, no nnunetv2 import, except :func:`resolve_dataset_folder` for dataset ids.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.io import atomic_write_text
from ...train.splits import Splits, make_splits

SPLITS_FILE = "splits_final.json"
# What nnU-Net does not need but a reader of the results does: seeds, test cases, the pool.
RECORD_FILE = "splits_final.maeformer.json"
GT_FOLDER = "gt_segmentations"  # nnUNetv2_plan_and_preprocess copies every training label here


@dataclass(frozen=True)
class SplitResult:
    """A written (or unchanged) few-label split: the nnU-Net file, maeformer's record of it, the backup
    of the file it replaced (None if none was replaced) and whether splits_final.json changed."""

    splits: Splits
    path: Path
    record: Path
    backup: Path | None
    changed: bool


def resolve_dataset_folder(dataset: str) -> Path:
    """The nnU-Net preprocessed folder of ``dataset``: an existing folder path as it is, else a dataset id
    (``4``) or name (``Dataset004_Hippocampus``) resolved by nnunetv2's own functions under
    ``$nnUNet_preprocessed``."""
    if Path(dataset).is_dir():
        return Path(dataset)
    try:
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    except ImportError as error:
        raise ValueError(
            f"{dataset}: not a folder, and resolving an nnU-Net dataset id or name needs nnunetv2 "
            "(pip install nnunetv2); or pass the folder $nnUNet_preprocessed/DatasetXXX_Name"
        ) from error
    try:  # nnU-Net says what is wrong (unknown id, unset variables) with RuntimeErrors
        name = maybe_convert_to_dataset_name(dataset)
        folder = Path(nnUNet_preprocessed.require()) / name
    except RuntimeError as error:
        raise ValueError(f"nnU-Net dataset {dataset}: {error}") from error
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no preprocessed folder of {name}; run nnUNetv2_plan_and_preprocess -d {dataset} first"
        )
    return folder


def training_cases(dataset_folder: str | Path) -> list[str]:
    """The identifiers of the dataset's training cases: its labels in ``gt_segmentations/`` (what
    ``nnUNetv2_plan_and_preprocess`` copies from ``labelsTr``), named with dataset.json's ``file_ending``."""
    folder = Path(dataset_folder)
    meta_path, gt = folder / "dataset.json", folder / GT_FOLDER
    if not meta_path.is_file() or not gt.is_dir():
        raise FileNotFoundError(
            f"{folder}: not an nnU-Net preprocessed dataset folder (needs dataset.json and {GT_FOLDER}/); "
            "run nnUNetv2_plan_and_preprocess first"
        )
    ending = json.loads(meta_path.read_text()).get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise ValueError(f"{meta_path}: no file_ending")
    cases = sorted(p.name[: -len(ending)] for p in gt.iterdir() if p.name.endswith(ending))
    if not cases:
        raise ValueError(f"{gt}: no {ending} labels; run nnUNetv2_plan_and_preprocess again")
    return cases


def few_label_split(
    cases: list[str],
    labeled: int,
    seed: int,
    split_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> Splits:
    """maeformer's split of ``cases`` (``make_splits``) with ``labeled`` training cases drawn by ``seed``."""
    return make_splits(cases, val_fraction, test_fraction, split_seed, labeled=labeled, subset_seed=seed)


def write_split(
    dataset_folder: str | Path, splits: Splits, settings: dict[str, Any], force: bool = False
) -> SplitResult:
    """Write fold 0 of ``splits`` as ``<dataset_folder>/splits_final.json`` and ``settings`` (seeds,
    fractions) with every case list as ``splits_final.maeformer.json``, each atomically.

    An existing splits_final.json that differs (another split, nnU-Net's own 5-fold file, or unreadable)
    is replaced only with ``force``, and then kept as ``splits_final.json.bakN`` (the first free N).
    An identical one is left as it is.
    """
    folder = Path(dataset_folder)
    path, record = folder / SPLITS_FILE, folder / RECORD_FILE
    folds = [{"train": splits.train, "val": splits.val}]
    backup = None
    existing = _read_json(path) if path.exists() else None
    changed = existing != folds
    if changed and path.exists():
        if not force:
            raise FileExistsError(
                f"{path} exists and holds another split ({_describe(existing)}); pass --force to replace "
                f"it (the old file is kept as {path.name}.bakN)"
            )
        backup = _free_backup_name(path)
        shutil.copy2(path, backup)
    if changed:
        atomic_write_text(path, json.dumps(folds, indent=2))
    atomic_write_text(record, json.dumps({**settings, **splits.to_dict()}, indent=2))
    return SplitResult(splits, path, record, backup, changed)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # unreadable: differs from any split


def _describe(folds: Any) -> str:
    if not isinstance(folds, list) or not all(isinstance(f, dict) for f in folds):
        return "not a list of folds"
    first = folds[0] if folds else {}
    return (
        f"{len(folds)} fold(s); fold 0: {len(first.get('train', []))} training, "
        f"{len(first.get('val', []))} validation cases"
    )


def _free_backup_name(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.bak{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.bak{n}")
