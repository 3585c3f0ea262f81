"""Reading one case with every voxel-level check; problems are collected, not raised one by one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DatasetError, Problem
from .io import Volume, read_volume
from .layout import CaseFiles

# Affines of image channels and label may differ by float noise from NIfTI qform/sform round trips.
AFFINE_ATOL = 1e-3


@dataclass
class LoadedCase:
    """A validated case in stored voxel order.

    ``image``: (C, I, J, K) float32; ``label``: (I, J, K) uint8 or None; ``affine``: (4, 4).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray


def load_case(case: CaseFiles, num_channels: int, label_values: set[int] | None) -> LoadedCase:
    """Read and check one case; raise DatasetError listing all of its problems.

    Checks: unreadable/truncated files, NaN/Inf voxels, 4D where 3D is expected (or a 4D file whose
    channel count does not match ``num_channels``), channel or label shape/affine mismatch, label values
    outside ``label_values`` (the declared classes; None accepts any value 0..255).
    """
    problems: list[Problem] = []
    channels: list[np.ndarray] = []
    affine: np.ndarray | None = None
    vols: list[Volume] = []
    for path in case.images:
        try:
            vols.append(read_volume(path, kind="image"))
        except DatasetError as err:
            problems.extend(err.problems)
    for vol in vols:
        data = vol.data
        if case.four_d:
            if data.ndim != 4 or data.shape[3] != num_channels:
                problems.append(
                    Problem(
                        str(vol.path),
                        f"expected a 4D image with {num_channels} channels on "
                        f"the last axis, got shape {data.shape}",
                    )
                )
                continue
            channels.extend(np.moveaxis(data, 3, 0))
        elif data.ndim != 3:
            if data.ndim == 4 and data.shape[3] == 1:
                problems.append(
                    Problem(
                        str(vol.path),
                        f"4D image where 3D expected (shape {data.shape}; "
                        "a single channel must be stored as 3D)",
                    )
                )
            else:
                problems.append(
                    Problem(
                        str(vol.path),
                        f"{data.ndim}D image where 3D expected "
                        f"(shape {data.shape}; dataset declares {num_channels} channel(s))",
                    )
                )
            continue
        else:
            channels.append(data)
        if affine is None:
            affine = vol.affine
            shape = data.shape[:3]
        elif data.shape[:3] != shape:
            problems.append(
                Problem(
                    str(vol.path),
                    f"channel shape {data.shape[:3]} differs from {shape} of {case.images[0].name}",
                )
            )
        elif not np.allclose(vol.affine, affine, atol=AFFINE_ATOL):
            problems.append(Problem(str(vol.path), f"channel affine differs from {case.images[0].name}"))
    if not case.four_d and len(case.images) != num_channels and not problems:
        problems.append(
            Problem(
                str(case.images[0]),
                f"case has {len(case.images)} channel file(s), dataset declares {num_channels}",
            )
        )
    label = None
    if case.label is not None:
        try:
            lab = read_volume(case.label, kind="label")
        except DatasetError as err:
            problems.extend(err.problems)
        else:
            label = _check_label(lab, channels[0].shape if channels else None, affine, label_values, problems)
    if problems:
        raise DatasetError(problems)
    return LoadedCase(case.case_id, np.stack(channels).astype(np.float32, copy=False), label, affine)


def _check_label(
    lab: Volume,
    shape: tuple[int, ...] | None,
    affine: np.ndarray | None,
    label_values: set[int] | None,
    problems: list[Problem],
) -> np.ndarray | None:
    where = str(lab.path)
    data = lab.data
    if data.ndim == 4 and data.shape[3] == 1:
        problems.append(Problem(where, f"4D label where 3D expected (shape {data.shape})"))
        return None
    if data.ndim != 3:
        problems.append(Problem(where, f"{data.ndim}D label where 3D expected (shape {data.shape})"))
        return None
    ok = True
    if shape is not None and data.shape != shape:
        problems.append(Problem(where, f"label shape {data.shape} does not match image shape {shape}"))
        ok = False
    elif affine is not None and not np.allclose(lab.affine, affine, atol=AFFINE_ATOL):
        diff = float(np.abs(lab.affine - affine).max())
        problems.append(Problem(where, f"label affine does not match image affine (max diff {diff:.4g})"))
        ok = False
    values = np.unique(data)
    # Without declared classes any uint8 value is accepted (it must still fit the uint8 cache array).
    allowed = label_values if label_values is not None else set(range(256))
    outside = sorted(int(v) for v in values if int(v) not in allowed)
    if outside:
        shown = ", ".join(map(str, outside[:10])) + (" ..." if len(outside) > 10 else "")
        declared = sorted(allowed) if label_values is not None else "0..255"
        problems.append(Problem(where, f"label values outside the declared classes {declared}: {shown}"))
        ok = False
    return data.astype(np.uint8) if ok else None
