"""Reproducible case splits: a fixed test and validation split, and labeled subsets of the rest."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Splits:
    """Disjoint case lists. ``train`` holds the labeled cases used for training; ``pool`` all labeled
    cases outside validation and test, of which ``train`` is a subset."""

    train: list[str]
    val: list[str]
    test: list[str]
    pool: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def make_splits(
    labeled_cases: list[str],
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    labeled: int | None = None,
    labeled_fraction: float | None = None,
    subset_seed: int = 0,
) -> Splits:
    """Split labeled cases into test / validation / training pool, then pick ``labeled`` training cases.

    The test and validation sets depend on ``split_seed`` only, never on the labeled count or the
    training seed, so every arm and labeled count of a study is evaluated on the same cases. The
    labeled subset is the first ``labeled`` cases of the pool shuffled by ``subset_seed``, so smaller
    subsets of one seed are nested in larger ones.
    """
    if labeled is not None and labeled_fraction is not None:
        raise ValueError("give either labeled or labeled_fraction, not both")
    cases = sorted(labeled_cases)
    if len(cases) < 3:
        raise ValueError(f"need at least 3 labeled cases for train/val/test splits, got {len(cases)}")
    random.Random(split_seed).shuffle(cases)
    n_test = max(1, round(len(cases) * test_fraction))
    n_val = max(1, round(len(cases) * val_fraction))
    test, val, pool = cases[:n_test], cases[n_test : n_test + n_val], cases[n_test + n_val :]
    if not pool:
        raise ValueError(f"no training cases left after {n_test} test and {n_val} validation cases")
    order = sorted(pool)
    random.Random(subset_seed).shuffle(order)
    count = len(order) if labeled is None and labeled_fraction is None else labeled
    if labeled_fraction is not None:
        if not 0 < labeled_fraction <= 1:
            raise ValueError(f"labeled_fraction must lie in (0, 1], got {labeled_fraction}")
        count = max(1, round(labeled_fraction * len(order)))
    if not 1 <= count <= len(order):
        raise ValueError(f"labeled={count} but the training pool has {len(order)} labeled cases")
    return Splits(train=sorted(order[:count]), val=sorted(val), test=sorted(test), pool=sorted(pool))


def scored_cases(split_file: str | Path) -> set[str]:
    """The validation and test cases of a split file: ``maeformer finetune``'s ``splits.json`` or
    ``maeformer nnunet-split``'s ``splits_final.maeformer.json`` (both hold ``val`` and ``test`` lists).

    These are the cases a run is scored on, which pretraining must not see for the score to hold.
    """
    path = Path(split_file)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the split file ({err})") from err
    lists = [record.get(key) for key in ("val", "test")] if isinstance(record, dict) else [None]
    if not all(isinstance(cases, list) for cases in lists):
        raise ValueError(
            f"{path}: not a split file (no 'val' and 'test' lists); pass a splits.json of `maeformer "
            "finetune` or a splits_final.maeformer.json of `maeformer nnunet-split`"
        )
    return {str(case) for cases in lists for case in cases}
