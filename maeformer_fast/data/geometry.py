"""Voxel-grid geometry: reorientation to RAS, resampling, nonzero crop, and their exact inverses.

Axis conventions: NIfTI arrays are indexed (i, j, k); after reorientation to RAS, i runs to the
right, j anterior, k superior. Preprocessed arrays are stored transposed as (Z, Y, X) = (k, j, i), so
spacings in plans are (z, y, x) too. Resampling uses "grid mode": a volume of n voxels of size s covers
[-0.5, n - 0.5] voxels = n * s mm, and resampling to n' voxels keeps that extent, so the new voxel size
is n * s / n' and the new voxel q sits at old index (q + 0.5) * n / n' - 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient (C, I, J, K) ``data`` to the closest RAS orientation (like nibabel as_closest_canonical).

    Returns (data (C, I', J', K'), RAS affine (4, 4), ornt (3, 2) the nibabel orientation of the input).
    """
    from nibabel import orientations as ort  # lazy: see io._nibabel

    ornt = ort.io_orientation(affine)
    if np.array_equal(ornt, RAS_ORNT):
        return data, affine.copy(), ornt
    spatial = data.shape[1:4]
    out = np.stack([ort.apply_orientation(ch, ornt) for ch in data])
    return out, affine @ ort.inv_ornt_aff(ornt, spatial), ornt


def from_ras(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo ``to_ras`` on an (I', J', K') array: back to the input's own voxel order (I, J, K)."""
    from nibabel import orientations as ort

    ornt = np.asarray(ornt, dtype=np.float64)
    if np.array_equal(ornt, RAS_ORNT):
        return data
    return np.ascontiguousarray(ort.apply_orientation(data, ort.ornt_transform(RAS_ORNT, ornt)))


def nonzero_bbox(image: np.ndarray, label: np.ndarray | None = None) -> list[list[int]]:
    """[[start, stop] per spatial axis] of voxels nonzero in any channel of (C, Z, Y, X) ``image`` or in
    ``label`` (Z, Y, X), so cropping never drops labeled voxels. All-zero volumes keep their full extent."""
    mask = np.any(image != 0, axis=0)
    if label is not None:
        mask |= label > 0
    if not mask.any():
        return [[0, int(s)] for s in mask.shape]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append([int(idx[0]), int(idx[-1]) + 1])
    return box


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Voxel counts (Z, Y, X) that cover the same extent at the ``target`` spacing."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True))


def resample_image(data: np.ndarray, shape: tuple[int, ...], order: int = 3) -> np.ndarray:
    """Resample (C, Z, Y, X) float ``data`` to spatial ``shape`` (grid mode, spline ``order``)."""
    from scipy import ndimage

    if tuple(data.shape[1:]) == tuple(shape):
        return data
    zoom = [n_new / n_old for n_new, n_old in zip(shape, data.shape[1:], strict=True)]
    out = np.stack(
        [
            ndimage.zoom(ch, zoom, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
            for ch in data
        ]
    )
    # zoom rounds its output shape itself; pin it to the requested one (differs by a voxel at most).
    return _fit(out, (data.shape[0], *shape)).astype(np.float32, copy=False)


def resample_nearest(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of an integer (Z, Y, X) array in grid mode (exact index mapping)."""
    if tuple(label.shape) == tuple(shape):
        return label
    idx = [
        np.minimum(((np.arange(n_new) + 0.5) * n_old / n_new).astype(np.int64), n_old - 1)
        for n_new, n_old in zip(shape, label.shape, strict=True)
    ]
    return np.ascontiguousarray(label[np.ix_(*idx)])


def resampled_affine(
    affine_zyx: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]
) -> np.ndarray:
    """Index->world (4, 4) of a grid-mode resampling, from the (Z, Y, X)-index affine of the old grid."""
    scale = np.array([o / n for o, n in zip(old_shape, new_shape, strict=True)])
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = 0.5 * scale - 0.5  # new voxel q sits at old index (q + 0.5) * scale - 0.5
    return affine_zyx @ step


def zyx_affine(affine_ijk: np.ndarray) -> np.ndarray:
    """Turn an (i, j, k)-index affine into one indexed (Z, Y, X) = (k, j, i)."""
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    return affine_ijk @ perm


def restore_to_original(label: np.ndarray, geometry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Put a (Z, Y, X) array in preprocessed space back into the source's own voxel grid.

    Undoes the resampling (nearest neighbour), the nonzero crop (outside is 0) and the reorientation.
    Returns (array (I, J, K) with the source's shape, the source's (4, 4) affine), ready for
    ``write_nifti``.
    """
    crop_shape = tuple(b - a for a, b in geometry["crop_bbox"])
    expected = tuple(geometry["preprocessed_shape"])
    if tuple(label.shape) != expected:
        raise ValueError(f"array shape {label.shape} differs from the preprocessed shape {expected}")
    cropped = resample_nearest(label, crop_shape)
    full = np.zeros(tuple(geometry["ras_shape_zyx"]), dtype=label.dtype)
    full[tuple(slice(a, b) for a, b in geometry["crop_bbox"])] = cropped
    ras_ijk = full.transpose(2, 1, 0)
    out = from_ras(ras_ijk, np.asarray(geometry["ornt"]))
    return np.ascontiguousarray(out), np.asarray(geometry["original_affine"], dtype=np.float64)


def _fit(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop or edge-pad ``arr`` to ``shape``."""
    if arr.shape == shape:
        return arr
    arr = arr[tuple(slice(0, s) for s in shape)]
    pad = [(0, s - a) for a, s in zip(arr.shape, shape, strict=True)]
    return np.pad(arr, pad, mode="edge")
