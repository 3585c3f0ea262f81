"""Preprocessing cache: fingerprint, plan, per-case reorient/crop/resample/normalise, .npy + JSON.

Two passes over the cases, both parallel: (1) validate every case and collect its fingerprint
(shape, spacing, intensity stats) -- this is where all bad cases are found and reported together --
then (2) preprocess with the plan derived from the fingerprint (median spacing, CT statistics).
Both passes reuse results of unchanged sources (size + mtime), so a re-run reads nothing new.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from .cache import CASES_DIR, PLAN_FILE, PLAN_VERSION, cached_array, case_file, is_cache, load_plan
from .errors import DatasetError, Problem
from .geometry import (
    nonzero_bbox,
    resample_image,
    resample_nearest,
    resampled_affine,
    target_shape,
    to_ras,
    zyx_affine,
)
from .io import atomic_save_npy, atomic_write_text, file_stamp
from .layout import CaseFiles, DatasetLayout, scan_layout
from .validate import LoadedCase, load_case

FG_SAMPLES_PER_CLASS = 10_000  # foreground voxels kept per class for oversampling (as nnU-Net)
CT_SAMPLES_PER_CASE = 2_000  # foreground intensities per case for the dataset-level CT percentiles
FINGERPRINT_FILE = "fingerprint.json"
NNUNET_DATASET_NAME = re.compile(r"Dataset\d{3}_")  # nnU-Net v2 dataset folders: Dataset004_Hippocampus


def default_workers() -> int:
    """Worker processes for preprocessing: all cores, at most 8 (I/O and gzip bound beyond that)."""
    return max(1, min(8, os.cpu_count() or 1))


def preprocess_dataset(
    src: str | Path,
    out: str | Path,
    target_spacing: Sequence[float] | None = None,
    modality: str | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> Path:
    """Preprocess the dataset folder ``src`` into the cache folder ``out`` and return ``out``.

    ``target_spacing``: (z, y, x) mm, default the median spacing of the dataset. ``modality``: "CT"
    (clipped z-score with dataset foreground statistics) or anything else, e.g. "MRI" (per-volume
    z-score), overriding the channel names in dataset.json. Raises DatasetError listing every bad case,
    unless ``skip_bad``: then bad cases are left out with a warning and listed in plan.json.
    """
    out = Path(out)
    source, target = Path(src).resolve(), out.resolve()
    if target == source or source in target.parents:
        raise ValueError(f"{out}: the cache must not be the dataset folder {src} or inside it")
    layout, problems = scan_layout(src)
    if layout is None:
        raise DatasetError(problems, src)
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    n_ch = len(layout.channel_names)
    label_values = set(layout.labels) if layout.labels else None
    schemes = [_scheme(modality or name) for name in layout.channel_names]
    need_samples = "ct" in schemes

    # Pass 1: validate + fingerprint, reusing entries of unchanged sources.
    old_fp = _read_json(out / FINGERPRINT_FILE).get("cases", {})
    fingerprints: dict[str, dict[str, Any]] = {}
    todo: list[CaseFiles] = []
    for case in layout.cases:
        entry = old_fp.get(case.case_id)
        if entry and entry.get("stamps") == _stamps(case) and (entry.get("ct_samples") or not need_samples):
            fingerprints[case.case_id] = entry
        else:
            todo.append(case)
    for case, result in _run_parallel(
        _fingerprint_case, todo, (n_ch, label_values, need_samples), workers, progress, "fingerprint"
    ):
        if isinstance(result, DatasetError):
            problems.extend(result.problems)
        else:
            fingerprints[case.case_id] = result
    bad_ids = {c.case_id for c in layout.cases if c.case_id not in fingerprints}
    if problems:
        if not skip_bad:
            raise DatasetError(problems, layout.root)
        warnings.warn(
            f"skipping {len(bad_ids)} bad case(s) in {layout.root}:\n"
            + "\n".join(f"  - {p}" for p in problems),
            stacklevel=2,
        )
    cases = [c for c in layout.cases if c.case_id not in bad_ids]
    if not cases:
        raise DatasetError(problems or [Problem(str(layout.root), "no usable cases")], layout.root)
    fingerprint = _summarise(fingerprints, cases, n_ch)
    atomic_write_text(out / FINGERPRINT_FILE, json.dumps(fingerprint, indent=1))

    plan = _make_plan(layout, cases, fingerprint, fingerprints, target_spacing, schemes, problems)
    atomic_write_text(out / PLAN_FILE, json.dumps(plan, indent=1))
    if layout.readme is not None:
        shutil.copyfile(layout.readme, out / "README.md")

    # Pass 2: preprocess the cases whose cached result is missing or stale.
    stale = [c for c in cases if not _up_to_date(out, c, plan["plan_hash"])]
    for _case, result in _run_parallel(
        _preprocess_case, stale, (plan, str(out), n_ch, label_values), workers, progress, "preprocess"
    ):
        if isinstance(result, DatasetError):  # a file changed between the passes
            raise result
    return out


def default_cache_dir(src: str | Path) -> Path:
    """``<src>/../<name>_maeformer_cache``, or ``~/.cache/maeformer_fast/<name>-<hash>`` when the
    folder above ``src`` is not writable (e.g. a read-only shared dataset).

    Next to an nnU-Net ``DatasetXXX_Name`` folder it is ``maeformer_cache_<name>`` instead: nnU-Net
    takes every folder of nnUNet_raw whose name starts with ``DatasetXXX`` for dataset XXX, and refuses
    the id when there are two."""
    src = Path(src).resolve()
    if _writable(src.parent):
        nnunet = NNUNET_DATASET_NAME.match(src.name)
        return src.parent / (f"maeformer_cache_{src.name}" if nnunet else f"{src.name}_maeformer_cache")
    digest = hashlib.sha1(str(src).encode()).hexdigest()[:10]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "maeformer_fast" / f"{src.name}-{digest}"


def _writable(folder: Path) -> bool:
    # Root passes os.access on any folder, so a folder whose mode has no write bit (a shared,
    # read-only dataset location) also counts as read-only.
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def ensure_preprocessed(src_or_cache: str | Path, cache_dir: str | Path | None = None, **kwargs: Any) -> Path:
    """Return a cache folder for ``src_or_cache``: the folder itself if it is already a cache, else
    the cache of the raw dataset (built, or refreshed for changed cases, by ``preprocess_dataset``
    with ``kwargs``) at ``cache_dir`` or ``default_cache_dir(src)``."""
    path = Path(src_or_cache)
    if is_cache(path):
        return path
    return preprocess_dataset(path, cache_dir if cache_dir is not None else default_cache_dir(path), **kwargs)


def preprocess_volume(
    image_paths: str | Path | Sequence[str | Path], plan: str | Path | dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess one new volume (for inference) exactly as the cache of ``plan`` was built.

    ``image_paths``: one file per channel, or one 4D file holding all channels. ``plan``: a plan dict,
    plan.json or cache folder. Returns (image (C, Z, Y, X) float32, geometry dict for
    ``restore_to_original``). Raises DatasetError for bad files.
    """
    plan = load_plan(plan)
    paths = (Path(image_paths),) if isinstance(image_paths, (str, Path)) else tuple(map(Path, image_paths))
    n_ch = len(plan["channel_names"])
    case = CaseFiles(paths[0].name, paths, None, "predict", four_d=len(paths) == 1 and n_ch > 1)
    loaded = load_case(case, n_ch, None)
    image, _, geometry = _transform(loaded, plan)
    return image, geometry


# ----------------------------------------------------------------------------------------------------
# per-case work (runs in worker processes)


def _fingerprint_case(
    case: CaseFiles, n_ch: int, label_values: set[int] | None, need_samples: bool
) -> dict[str, Any]:
    loaded = load_case(case, n_ch, label_values)
    image, affine, _ = to_ras(loaded.image, loaded.affine)
    spacing_ijk = np.linalg.norm(affine[:3, :3], axis=0)
    # CT statistics come from labeled foreground (as nnU-Net); unlabeled cases use nonzero voxels.
    label = loaded.label
    if label is not None:
        label, _, _ = to_ras(label[None], loaded.affine)
        fg = label[0] > 0
    else:
        fg = np.any(image != 0, axis=0)
    stats = []
    samples = []
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    for ch in image:
        stats.append(
            {
                "mean": float(ch.mean()),
                "std": float(ch.std()),
                "min": float(ch.min()),
                "max": float(ch.max()),
                "p00_5": float(np.percentile(ch, 0.5)),
                "p99_5": float(np.percentile(ch, 99.5)),
            }
        )
        if need_samples:
            vals = ch[fg] if fg.any() else ch.ravel()
            take = rng.choice(vals.size, size=min(CT_SAMPLES_PER_CASE, vals.size), replace=False)
            samples.append([round(float(v), 4) for v in vals[take]])
    return {
        "stamps": _stamps(case),
        "shape": [int(s) for s in image.shape[3:0:-1]],
        "spacing": [float(s) for s in spacing_ijk[::-1]],
        "has_label": case.label is not None,
        "intensity": stats,
        "ct_samples": samples,
    }


def _preprocess_case(
    case: CaseFiles, plan: dict[str, Any], out: str, n_ch: int, label_values: set[int] | None
) -> str:
    loaded = load_case(case, n_ch, label_values)
    image, label, geometry = _transform(loaded, plan)
    out_dir = Path(out)
    atomic_save_npy(case_file(out_dir, case.case_id, "image"), image)
    if label is not None:
        atomic_save_npy(case_file(out_dir, case.case_id, "label"), label)
        atomic_save_npy(case_file(out_dir, case.case_id, "fg"), _foreground_samples(label, case.case_id))
    record = {
        "case_id": case.case_id,
        "plan_hash": plan["plan_hash"],
        "stamps": _stamps(case),
        "has_label": label is not None,
        "geometry": geometry,
    }
    atomic_write_text(case_file(out_dir, case.case_id, "json"), json.dumps(record, indent=1))
    return case.case_id


def _transform(loaded: LoadedCase, plan: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Reorient, crop to nonzero, resample, normalise: (C, I, J, K) source -> (C, Z, Y, X) cache."""
    image_ras, ras_affine, ornt = to_ras(loaded.image, loaded.affine)
    image = np.ascontiguousarray(image_ras.transpose(0, 3, 2, 1))  # (C, K, J, I) = (C, Z, Y, X)
    label = None
    if loaded.label is not None:
        label = np.ascontiguousarray(to_ras(loaded.label[None], loaded.affine)[0][0].transpose(2, 1, 0))
    affine_zyx = zyx_affine(ras_affine)
    spacing_before = [float(s) for s in np.linalg.norm(affine_zyx[:3, :3], axis=0)]
    bbox = nonzero_bbox(image, label)
    crop = (slice(None), *(slice(a, b) for a, b in bbox))
    image = image[crop]
    crop_affine = affine_zyx.copy()
    crop_affine[:3, 3] = affine_zyx[:3, :3] @ np.array([a for a, _ in bbox]) + affine_zyx[:3, 3]
    crop_shape = image.shape[1:]
    new_shape = target_shape(crop_shape, spacing_before, plan["spacing"])
    image = resample_image(image, new_shape, order=3)
    if label is not None:
        label = resample_nearest(np.ascontiguousarray(label[crop[1:]]), new_shape).astype(np.uint8)
    image = _normalise(image, plan["normalization"])
    out_affine = resampled_affine(crop_affine, crop_shape, new_shape)
    geometry = {
        "original_shape": [int(s) for s in loaded.image.shape[1:]],
        "original_affine": loaded.affine.tolist(),
        "ornt": np.asarray(ornt).tolist(),
        "ras_shape_zyx": [int(s) for s in image_ras.shape[3:0:-1]],
        "spacing_before": spacing_before,
        "crop_bbox": bbox,
        "spacing_after": [float(s) for s in np.linalg.norm(out_affine[:3, :3], axis=0)],
        "preprocessed_shape": [int(s) for s in new_shape],
        "preprocessed_affine": out_affine.tolist(),
    }
    return np.ascontiguousarray(image, dtype=np.float32), label, geometry


def _normalise(image: np.ndarray, params: list[dict[str, Any]]) -> np.ndarray:
    """Per channel: z-score over the (cropped) volume, or CT clip + z-score with dataset statistics."""
    out = np.empty_like(image, dtype=np.float32)
    for c, (ch, p) in enumerate(zip(image, params, strict=True)):
        if p["scheme"] == "ct":
            ch = np.clip(ch, p["lower"], p["upper"])
            mean, std = p["mean"], p["std"]
        else:
            mean, std = float(ch.mean()), float(ch.std())
        out[c] = (ch - mean) / max(std, 1e-8)
    return out


def _foreground_samples(label: np.ndarray, case_id: str) -> np.ndarray:
    """(N, 4) int32 rows (class, z, y, x), at most FG_SAMPLES_PER_CLASS per class, sorted by class."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    rows = []
    for cls in np.unique(label):
        if cls == 0:
            continue
        where = np.argwhere(label == cls)
        if len(where) > FG_SAMPLES_PER_CLASS:
            where = where[np.sort(rng.choice(len(where), FG_SAMPLES_PER_CLASS, replace=False))]
        rows.append(np.concatenate([np.full((len(where), 1), cls), where], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


# ----------------------------------------------------------------------------------------------------
# plan and bookkeeping


def _scheme(name: str) -> str:
    return "ct" if name.strip().upper() == "CT" else "zscore"


def _summarise(fps: dict[str, dict[str, Any]], cases: list[CaseFiles], n_ch: int) -> dict[str, Any]:
    entries = [fps[c.case_id] for c in cases]
    spacings = np.array([e["spacing"] for e in entries])
    shapes = np.array([e["shape"] for e in entries])
    channels = []
    for c in range(n_ch):
        samples = np.concatenate(
            [np.asarray(e["ct_samples"][c], np.float64) for e in entries if e["ct_samples"]] or [np.zeros(0)]
        )
        channels.append(
            {
                "mean_of_case_means": float(np.mean([e["intensity"][c]["mean"] for e in entries])),
                "foreground": None
                if samples.size == 0
                else {
                    "mean": float(samples.mean()),
                    "std": float(samples.std()),
                    "p00_5": float(np.percentile(samples, 0.5)),
                    "p99_5": float(np.percentile(samples, 99.5)),
                },
            }
        )
    return {
        "num_cases": len(entries),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "median_shape": np.median(shapes, axis=0).tolist(),
        "min_shape": shapes.min(axis=0).tolist(),
        "max_shape": shapes.max(axis=0).tolist(),
        "channels": channels,
        "cases": fps,
    }


def _make_plan(
    layout: DatasetLayout,
    cases: list[CaseFiles],
    fingerprint: dict[str, Any],
    fps: dict[str, dict[str, Any]],
    target_spacing: Sequence[float] | None,
    schemes: list[str],
    problems: list[Problem],
) -> dict[str, Any]:
    spacing = [float(s) for s in (target_spacing or fingerprint["median_spacing"])]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"target spacing must be 3 positive numbers (z, y, x), got {spacing}")
    norm = []
    for scheme, ch in zip(schemes, fingerprint["channels"], strict=True):
        if scheme == "ct" and ch["foreground"] is not None:
            fg = ch["foreground"]
            norm.append(
                {
                    "scheme": "ct",
                    "lower": fg["p00_5"],
                    "upper": fg["p99_5"],
                    "mean": fg["mean"],
                    "std": fg["std"],
                }
            )
        else:
            norm.append({"scheme": "zscore"})
    labels = {str(k): v for k, v in layout.labels.items()} if layout.labels else None
    core = {
        "version": PLAN_VERSION,
        "spacing": spacing,
        "channel_names": layout.channel_names,
        "normalization": norm,
        "labels": labels,
    }
    return hashed_plan(
        core,
        name=layout.name,
        source=str(layout.root.resolve()),
        modality=[n["scheme"] for n in norm],
        num_classes=(max(layout.labels) + 1) if layout.labels else None,
        num_channels=len(layout.channel_names),
        cases=[{"id": c.case_id, "has_label": c.label is not None, "split": c.split} for c in cases],
        skipped=[{"path": p.path, "problem": p.message} for p in problems],
    )


def hashed_plan(core: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A cache's plan: ``core`` (what the cached voxels depend on), its hash, which tells a cache built
    under other settings apart, and the other ``fields``."""
    plan_hash = hashlib.sha1(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]
    return {**core, "plan_hash": plan_hash, **fields}


def _stamps(case: CaseFiles) -> list[dict[str, Any]]:
    return [file_stamp(p) for p in (*case.images, *([case.label] if case.label else []))]


def _up_to_date(out: Path, case: CaseFiles, plan_hash: str) -> bool:
    """Whether the cached case was built from the current sources and plan and its arrays are intact:
    each must open as a .npy file whose data is as long as its header says (a truncated or emptied
    array is rebuilt, with a line on stderr, instead of being skipped)."""
    record = _read_json(case_file(out, case.case_id, "json"))
    if record.get("plan_hash") != plan_hash or record.get("stamps") != _stamps(case):
        return False
    needed = ["image"] + (["label", "fg"] if case.label is not None else [])
    for what in needed:
        try:
            cached_array(out, case.case_id, what)
        except ValueError as error:  # the cause: numpy's own words on the file
            path = case_file(out, case.case_id, what)
            message = (
                f"preprocess: {path}: damaged cache file ({error.__cause__}); rebuilding case {case.case_id}"
            )
            print(message, file=sys.stderr, flush=True)
            return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _run_parallel(
    fn: Callable[..., Any],
    cases: list[CaseFiles],
    args: tuple,
    workers: int | None,
    progress: bool,
    desc: str,
):
    """Yield (case, result or DatasetError) for ``fn(case, *args)`` over a process pool with tqdm."""
    from tqdm.auto import tqdm

    if not cases:
        return
    workers = default_workers() if workers is None else max(1, int(workers))
    bar = tqdm(total=len(cases), desc=desc, unit="case", disable=not progress)
    try:
        if workers == 1 or len(cases) == 1:
            for case in cases:
                yield case, _call(fn, case, args)
                bar.update()
            return
        # fork avoids re-importing the package (and torch) in every worker; spawn elsewhere.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(cases)), mp_context=ctx) as pool:
            futures: dict[Future, CaseFiles] = {pool.submit(_call, fn, c, args): c for c in cases}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
                bar.update()
    finally:
        bar.close()


def _call(fn: Callable[..., Any], case: CaseFiles, args: tuple) -> Any:
    try:
        return fn(case, *args)
    except DatasetError as err:
        return err
    except Exception as exc:  # anything else is still a problem of this file, not a reason to stop
        return DatasetError([Problem(str(case.images[0]), f"{type(exc).__name__}: {exc}")])
