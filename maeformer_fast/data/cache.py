"""Layout of a preprocessed cache folder and read access to it (no nibabel needed).

<cache>/plan.json            dataset plan: spacing, normalisation, classes, channels, case list
<cache>/fingerprint.json     per-case shapes/spacings/intensity stats and the dataset summary
<cache>/README.md            the source dataset's README/licence note, copied as is
<cache>/cases/<id>_image.npy float32 (C, Z, Y, X), C-order
<cache>/cases/<id>_label.npy uint8 (Z, Y, X) (labeled cases only)
<cache>/cases/<id>_fg.npy    int32 (N, 4) rows (class, z, y, x): sampled foreground voxels
<cache>/cases/<id>.json      geometry for restore_to_original + source stamps + plan hash; written
                             last, so its presence marks a complete case
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_text

PLAN_VERSION = 1
PLAN_FILE = "plan.json"
CASES_DIR = "cases"


def is_cache(path: str | Path) -> bool:
    """True if ``path`` is a preprocessed cache folder (holds a plan.json)."""
    return (Path(path) / PLAN_FILE).is_file()


def load_plan(cache_or_plan: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The plan dict of a cache folder, of a plan.json path, or a plan dict itself."""
    if isinstance(cache_or_plan, dict):
        return cache_or_plan
    path = Path(cache_or_plan)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no plan.json (not a maeformer preprocessed cache)")
    plan = json.loads(path.read_text())
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{path}: plan version {plan.get('version')} != {PLAN_VERSION}; re-run preprocess")
    return plan


def case_file(cache_dir: str | Path, case_id: str, what: str) -> Path:
    """Path of a case's ``image`` / ``label`` / ``fg`` array or its ``json`` geometry."""
    base = Path(cache_dir) / CASES_DIR
    return base / f"{case_id}.json" if what == "json" else base / f"{case_id}_{what}.npy"


def load_geometry(cache_dir: str | Path, case_id: str) -> dict[str, Any]:
    """The per-case geometry dict (see ``geometry.restore_to_original``)."""
    return json.loads(case_file(cache_dir, case_id, "json").read_text())["geometry"]


def cached_array(cache_dir: str | Path, case_id: str, kind: str) -> np.ndarray:
    """Memory-mapped ``kind`` ("image", "label", "fg") array of a case, naming the file if it is
    missing or damaged."""
    path = case_file(cache_dir, case_id, kind)
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:  # missing, truncated, empty, or not a .npy file
        raise ValueError(
            f"{path}: unreadable cache file ({error}); rebuild the cache with `maeformer preprocess`"
        ) from error


def open_case(cache_dir: str | Path, case_id: str, labeled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-mapped (C, Z, Y, X) float32 image and (Z, Y, X) uint8 label (None unless ``labeled``)."""
    image = cached_array(cache_dir, case_id, "image")
    label = cached_array(cache_dir, case_id, "label") if labeled else None
    return image, label


def select_cases(plan: dict[str, Any], cases: list[str] | None, labeled: bool) -> list[str]:
    """Case ids to sample from: ``cases`` (checked) or all cases (all labeled ones if ``labeled``)."""
    info = {c["id"]: c for c in plan["cases"]}
    if cases is None:
        chosen = [c["id"] for c in plan["cases"] if c["has_label"] or not labeled]
    else:
        chosen = list(cases)
        missing = [c for c in chosen if c not in info]
        if missing:
            raise KeyError(f"cases not in the cache: {missing[:10]}")
        if labeled:
            unlabeled = [c for c in chosen if not info[c]["has_label"]]
            if unlabeled:
                raise ValueError(f"labeled=True but these cases have no label: {unlabeled[:10]}")
    if not chosen:
        raise ValueError("no cases to load" + (" (no labeled cases in the cache)" if labeled else ""))
    return chosen


def cache_view(cache: str | Path, exclude: set[str], view: str | Path) -> Path:
    """A cache folder ``view`` that lists only the cases of ``cache`` not in ``exclude`` and shares its
    arrays: a filtered plan.json beside a link to the original ``cases/`` folder, no array copied.

    Everything that draws from a whole cache (pretraining) then never sees the excluded cases.
    """
    plan = load_plan(cache)
    view = Path(view)
    view.mkdir(parents=True, exist_ok=True)
    link = view / CASES_DIR
    if not link.exists():
        link.symlink_to((Path(cache) / CASES_DIR).resolve(), target_is_directory=True)
    plan["cases"] = [c for c in plan["cases"] if c["id"] not in exclude]
    atomic_write_text(view / PLAN_FILE, json.dumps(plan, indent=2))
    return view
