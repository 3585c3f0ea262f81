"""MAE pretraining on nnU-Net v2 preprocessed data: a configuration folder as a maeformer cache.

A configuration folder (``$nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans_3d_fullres``) holds
the arrays nnU-Net trains on: resampled to the configuration's spacing, cropped to the nonzero box and
normalised by the plans' schemes. :func:`convert_preprocessed` reads them with nnunetv2's own dataset
classes (blosc2 or numpy, whichever the folder holds) and writes each image unchanged -- same voxels,
same axis order, no resampling, no renormalisation -- as a maeformer cache (``data/cache.py``) whose
plan records the configuration's spacing and normalisation. So the encoder pretrains on exactly what
nnU-Net fine-tuning will show it. Labels are not carried over: the cache is for pretraining only.

nnU-Net preprocesses only the training cases (imagesTr); unlabeled images (imagesTs) are not in it.

The default pretraining crop is the plans' patch size rounded up per axis to the model's mask unit
(:func:`pretrain_crop`): the MAE masks whole units; rounding up keeps all of the context nnU-Net's patch
has, and gives the last encoder stage the token grid the fine-tuned network computes on the patch itself
(each stride-2, padding-1 layer gives ceil(L / 2) tokens, so ceil(patch / unit) in all).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...data.cache import CASES_DIR, PLAN_FILE, PLAN_VERSION, case_file
from ...data.io import atomic_save_npy, atomic_write_text
from ...data.layout import CaseFiles
from ...data.preprocess import _stamps, _up_to_date, default_cache_dir, hashed_plan
from ...types import Triple

DATA_SUFFIXES = (".b2nd", ".npz")  # nnU-Net's case arrays: nnUNetDatasetBlosc2 / nnUNetDatasetNumpy
# A case's files the cache copy depends on: the array (.npy: an unpacked .npz) and the properties
CASE_SUFFIXES = (*DATA_SUFFIXES, ".npy", ".pkl")
# JSON files of a preprocessed dataset folder that are never plans (splits_final*.json neither)
NOT_PLANS = {"dataset.json", "dataset_fingerprint.json"}


@dataclass(frozen=True)
class NnunetConfiguration:
    """One configuration of an nnU-Net plans file and its preprocessed folder.

    ``patch_size`` and ``spacing`` are in the axis order of the preprocessed arrays (nnU-Net's, after
    its ``transpose_forward``).
    """

    folder: Path
    dataset_name: str
    plans_file: Path
    plans_name: str
    configuration: str
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    normalization_schemes: list[str]
    channel_names: list[str]


def is_configuration_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like an nnU-Net preprocessed configuration folder: case arrays (.b2nd or
    .npz) with their .pkl properties, in a folder whose parent holds dataset.json. Names only."""
    folder = Path(path)
    if not folder.is_dir() or not (folder.parent / "dataset.json").is_file():
        return False
    names = [p.name for p in folder.iterdir()]
    return any(n.endswith(".pkl") for n in names) and any(n.endswith(DATA_SUFFIXES) for n in names)


def is_preprocessed_dataset(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net preprocessed dataset folder (dataset.json and a plans file, no
    imagesTr): the parent of configuration folders, not data itself."""
    folder = Path(path)
    return (
        (folder / "dataset.json").is_file()
        and not (folder / "imagesTr").is_dir()
        and bool(_plans_files(folder))
    )


def configuration_folders(dataset_folder: str | Path) -> list[Path]:
    """The configuration folders of a preprocessed dataset folder."""
    return sorted(p for p in Path(dataset_folder).iterdir() if is_configuration_folder(p))


def dataset_folder_message(dataset_folder: str | Path) -> str:
    """The error for a preprocessed dataset folder passed where a configuration folder belongs."""
    found = configuration_folders(dataset_folder)
    choices = ", ".join(str(p) for p in found) if found else "none yet: run nnUNetv2_plan_and_preprocess"
    return (
        f"{dataset_folder}: an nnU-Net preprocessed dataset folder; pass one of its configuration folders "
        f"(3d ones for pretraining): {choices}"
    )


def read_configuration(path: str | Path) -> NnunetConfiguration:
    """The plans configuration whose preprocessed data is the folder ``path``.

    Looks through the plans files next to it (``nnUNetPlans.json`` and any other) for configurations
    whose ``data_identifier`` is the folder's name; where several share it (``3d_cascade_fullres``
    inherits ``3d_fullres``'s), the one the folder is named after wins. Refuses 2d configurations.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    dataset_folder = folder.parent
    if is_preprocessed_dataset(folder):
        raise ValueError(dataset_folder_message(folder))
    if not is_configuration_folder(folder):
        raise ValueError(
            f"{folder}: not an nnU-Net preprocessed configuration folder (needs .b2nd or .npz case arrays "
            f"with .pkl files, and dataset.json in {dataset_folder})"
        )
    matches = []
    for plans_file in _plans_files(dataset_folder):
        plans = PlansManager(str(plans_file))
        for name in plans.available_configurations:
            if plans.get_configuration(name).data_identifier == folder.name:
                matches.append((f"{plans.plans_name}_{name}" != folder.name, plans_file, plans, name))
    if not matches:
        raise ValueError(
            f"{folder}: no configuration of the plans files in {dataset_folder} "
            f"({', '.join(p.name for p in _plans_files(dataset_folder)) or 'none'}) preprocesses into it"
        )
    _, plans_file, plans, name = min(matches, key=lambda m: m[0])  # the folder's own name first
    config = plans.get_configuration(name)
    if len(config.patch_size) != 3:
        others = [p.name for p in configuration_folders(dataset_folder) if p != folder]
        raise ValueError(
            f"{folder}: configuration {name} is 2d; the 3D encoder pretrains on a 3d configuration "
            f"(here: {', '.join(others) or 'none preprocessed'})"
        )
    meta = json.loads((dataset_folder / "dataset.json").read_text())
    channels = meta.get("channel_names") or meta.get("modality") or {}
    return NnunetConfiguration(
        folder=folder,
        dataset_name=plans.dataset_name,
        plans_file=plans_file,
        plans_name=plans.plans_name,
        configuration=name,
        patch_size=tuple(int(s) for s in config.patch_size),
        spacing=tuple(float(s) for s in config.spacing),
        normalization_schemes=list(config.normalization_schemes),
        channel_names=[str(channels[k]) for k in sorted(channels, key=int)],
    )


def pretrain_crop(patch_size: Sequence[int], mask_unit: Sequence[int]) -> Triple:
    """The smallest crop holding ``patch_size`` that is a whole number of ``mask_unit`` per axis."""
    return tuple(math.ceil(p / u) * u for p, u in zip(patch_size, mask_unit, strict=True))  # type: ignore[return-value]


def convert_preprocessed(path: str | Path, out: str | Path | None = None, progress: bool = True) -> Path:
    """Write the images of the configuration folder ``path`` as a maeformer cache at ``out`` (default
    ``data.preprocess.default_cache_dir(path)``) and return it.

    Each case array is written exactly as nnunetv2's dataset class returns it (float32 (C, Z, Y, X) in
    nnU-Net's axis order); plan.json records the configuration's spacing, normalisation schemes and
    patch size. Atomic per file; a re-run skips cases whose nnU-Net files (size, mtime) and plan did not
    change and whose array is intact. plan.json is written last, so a folder with one is complete.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from tqdm.auto import tqdm

    config = read_configuration(path)
    out = Path(out) if out is not None else default_cache_dir(config.folder)
    source, target = config.folder.resolve(), out.resolve()
    if target == source or source in target.parents:
        raise ValueError(f"{out}: the cache must not be the nnU-Net folder {config.folder} or inside it")
    try:
        dataset_class = infer_dataset_class(str(config.folder))
    except AssertionError as error:  # nnunetv2 asserts when a folder mixes .b2nd and .npz arrays
        raise ValueError(f"{config.folder}: {error}") from error
    dataset = dataset_class(str(config.folder))
    plan = _make_plan(config, dataset.identifiers)
    if (out / PLAN_FILE).is_file() and json.loads((out / PLAN_FILE).read_text()) != plan:
        (out / PLAN_FILE).unlink()  # until every case is rewritten, the folder is no complete cache
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    names = {p.name for p in config.folder.iterdir()}
    for case_id in tqdm(dataset.identifiers, desc="nnU-Net -> cache", unit="case", disable=not progress):
        # The case's nnU-Net files go in as "images": their stamps tell whether the copy is current.
        sources = tuple(config.folder / f"{case_id}{s}" for s in CASE_SUFFIXES if f"{case_id}{s}" in names)
        files = CaseFiles(case_id, sources, None, "train")
        if _up_to_date(out, files, plan["plan_hash"]):
            continue
        image = np.asarray(dataset.load_case(case_id)[0][:])
        if image.dtype != np.float32 or image.ndim != 4 or image.shape[0] != plan["num_channels"]:
            raise ValueError(
                f"{config.folder}/{case_id}: expected a float32 (C, Z, Y, X) array with the "
                f"{plan['num_channels']} channels of dataset.json, got {image.dtype} {image.shape}"
            )
        atomic_save_npy(case_file(out, case_id, "image"), image)
        # nnU-Net's own .pkl keeps the geometry: predictions in nnU-Net's pipeline restore it there.
        record = {"case_id": case_id, "plan_hash": plan["plan_hash"], "stamps": _stamps(files),
                  "has_label": False, "geometry": None}  # fmt: skip
        atomic_write_text(case_file(out, case_id, "json"), json.dumps(record, indent=1))
    atomic_write_text(out / PLAN_FILE, json.dumps(plan, indent=1))
    return out


def _plans_files(dataset_folder: Path) -> list[Path]:
    found = []
    for path in sorted(dataset_folder.glob("*.json")):
        if path.name in NOT_PLANS or path.name.startswith("splits_final"):
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and "configurations" in content and "plans_name" in content:
            found.append(path)
    return found


def _make_plan(config: NnunetConfiguration, case_ids: list[str]) -> dict[str, Any]:
    nnunet = {
        "dataset": config.dataset_name,
        "plans": config.plans_name,
        "plans_file": str(config.plans_file.resolve()),
        "configuration": config.configuration,
        "patch_size": list(config.patch_size),
        "spacing": list(config.spacing),
        "normalization_schemes": config.normalization_schemes,
    }
    core = {
        "version": PLAN_VERSION,
        "spacing": list(config.spacing),
        "channel_names": config.channel_names,
        # Already applied by nnU-Net; named so that nothing mistakes them for maeformer's own schemes.
        "normalization": [{"scheme": "nnunet", "nnunet": s} for s in config.normalization_schemes],
        "labels": None,
        "nnunet": nnunet,
    }
    return hashed_plan(
        core,
        name=config.dataset_name,
        source=str(config.folder.resolve()),
        modality=config.normalization_schemes,
        num_classes=None,
        num_channels=len(config.channel_names),
        cases=[{"id": c, "has_label": False, "split": "train"} for c in sorted(case_ids)],
        skipped=[],
    )
