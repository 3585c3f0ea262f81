"""Dice and 95th-percentile Hausdorff distance per class.

Conventions (stated because papers differ): HD95 is the 95th percentile of both directed
surface-distance sets pooled (as medpy's ``binary.hd95`` and nnFormer's evaluation; MONAI's
``HausdorffDistanceMetric(percentile=95)`` takes the larger directed percentile instead). When
reference and prediction of a class are both empty,
Dice = 1 and HD95 = 0; when exactly one is empty, Dice = 0 and HD95 = NaN (undefined; reported as
such and left out of means, which also report how many cases they cover).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks."""
    total = prediction.sum() + reference.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(prediction, reference).sum() / total)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distances (in spacing units) from the surface voxels of ``a`` to the surface of ``b``."""
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    return distance_to_b[surface_a]


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th percentile of both directed surface-distance sets of two boolean masks, pooled (see the
    module conventions)."""
    if not prediction.any() and not reference.any():
        return 0.0
    if not prediction.any() or not reference.any():
        return float("nan")
    both = np.concatenate(
        [surface_distances(prediction, reference, spacing), surface_distances(reference, prediction, spacing)]
    )
    return float(np.percentile(both, 95))


def per_class_scores(
    prediction: np.ndarray,
    reference: np.ndarray,
    classes: list[int],
    spacing: tuple[float, ...],
    with_hd95=True,
) -> dict[int, dict[str, float]]:
    """{class: {"dice": ..., "hd95": ...}} for integer label maps of one case."""
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from reference shape {reference.shape}"
        )
    scores = {}
    for c in classes:
        p, r = prediction == c, reference == c
        scores[c] = {"dice": dice(p, r), "hd95": hd95(p, r, spacing) if with_hd95 else float("nan")}
    return scores
