"""Random MAE masks over mask units (one unit = the encoder's total stride, in voxels)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..types import Triple


def num_visible_units(unit_grid: Triple, mask_ratio: float) -> int:
    """Visible units per sample: round((1 - ratio) * units), at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1), got {mask_ratio}")
    total = math.prod(unit_grid)
    return max(1, round(total * (1.0 - mask_ratio)))


def random_unit_mask(
    batch_size: int,
    unit_grid: Triple,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A fresh random set of visible units per sample, drawn on ``device``.

    Returns:
        (B, K) int64 flat unit indices (C order over ``unit_grid``), sorted within each sample.
    """
    keep = num_visible_units(unit_grid, mask_ratio)
    noise = torch.rand(batch_size, math.prod(unit_grid), generator=generator, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def visible_mask_grid(visible_ids: Tensor, unit_grid: Triple) -> Tensor:
    """(B, K) visible unit ids -> (B, uz, uy, ux) bool, True where a unit is visible."""
    mask = torch.zeros(
        visible_ids.shape[0], math.prod(unit_grid), dtype=torch.bool, device=visible_ids.device
    )
    mask.scatter_(1, visible_ids, True)
    return mask.view(-1, *unit_grid)


def unit_corners(visible_ids: Tensor, unit_grid: Triple) -> tuple[Tensor, Tensor]:
    """(B, K) ids -> batch index (B*K,) and unit coordinates (B*K, 3) of every visible unit."""
    _, uy, ux = unit_grid
    flat = visible_ids.reshape(-1)
    batch = torch.arange(visible_ids.shape[0], device=flat.device).repeat_interleave(visible_ids.shape[1])
    corner = torch.stack([flat // (uy * ux), (flat // ux) % uy, flat % ux], dim=1)
    return batch, corner
