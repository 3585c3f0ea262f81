"""NIfTI reading and writing (nibabel, imported lazily) with the checks every volume must pass."""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..weights import replace_with
from .errors import problem

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | Path) -> bool:
    """True for ``*.nii`` / ``*.nii.gz`` names that are not hidden (macOS ``._x`` junk files are hidden)."""
    name = Path(path).name
    return not name.startswith(".") and name.endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``case_001.nii.gz`` -> ``case_001``."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Volume:
    """A NIfTI volume in its stored voxel order.

    ``data``: (I, J, K) or (I, J, K, C) array as stored (nibabel's i, j, k index order);
    ``affine``: (4, 4) voxel-index -> world (RAS+ mm) matrix.
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and (4, 4) affine of a NIfTI file without reading its voxels."""
    nib = _nibabel()
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers; all mean "unreadable"
        raise problem(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def read_volume(path: str | Path, *, kind: str = "image") -> Volume:
    """Read a NIfTI file and check its voxels.

    ``kind="image"`` gives float32 data and rejects NaN/Inf voxels; ``kind="label"`` keeps integer data
    (float-stored labels must hold whole numbers) and returns uint8-compatible int64 values.
    Raises DatasetError naming the file for unreadable headers, truncated/corrupt voxel data, NaN/Inf.
    """
    nib = _nibabel()
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise problem(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    try:
        # asanyarray(dataobj) applies scl_slope/inter but keeps integer dtypes for plain label files.
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise problem(path, f"truncated or corrupt voxel data ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise problem(path, "affine contains NaN/Inf")
    if kind == "image":
        data = np.asarray(data, dtype=np.float32)
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise problem(path, f"{bad} NaN/Inf voxel(s) in image")
    elif kind == "label":
        if data.dtype.kind == "f":
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if bad:
                raise problem(path, f"{bad} NaN/Inf voxel(s) in label")
            if not np.array_equal(data, np.round(data)):
                raise problem(path, "label holds non-integer values")
        data = np.asarray(data, dtype=np.int64)
    else:
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    return Volume(path=path, data=data, affine=affine)


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write (I, J, K) ``data`` with a (4, 4) ``affine`` as NIfTI-1 (gzip if the name ends in .gz)."""
    nib = _nibabel()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save a C-order .npy via a temp file + rename, so a killed run never leaves a half-written array."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
        replace_with(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temp file + rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        replace_with(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_stamp(path: str | Path) -> dict[str, Any]:
    """Size and mtime of a source file: the cache treats a case as stale when either changes."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _nibabel() -> Any:
    # Imported lazily: GPU test machines may run the loaders over an existing cache without nibabel.
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading NIfTI needs nibabel: pip install nibabel") from exc
    return nibabel
