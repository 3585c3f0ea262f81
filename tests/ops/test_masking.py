"""Random MAE masks: the visible count, distinct units per sample, fresh draws, unit alignment, and the
packed visible-token coordinates the sparse encoder receives."""

from __future__ import annotations

import math

import pytest
import torch

from maeformer_fast.models.mae import expand_units
from maeformer_fast.models.tokens import UnitLayout
from maeformer_fast.ops.masking import num_visible_units, random_unit_mask, unit_corners, visible_mask_grid


@pytest.mark.parametrize(
    ("grid", "ratio"), [((2, 3, 2), 0.75), ((4, 4, 4), 0.6), ((1, 1, 3), 0.0), ((3, 1, 1), 0.9)]
)
def test_mask_keeps_the_ratio_with_distinct_sorted_units(grid, ratio):
    ids = random_unit_mask(5, grid, ratio, torch.Generator().manual_seed(0))
    total = math.prod(grid)
    keep = max(1, round(total * (1 - ratio)))
    assert ids.shape == (5, keep) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < total
    for row in ids:
        assert torch.equal(row, row.unique())  # distinct and sorted
    assert torch.equal(visible_mask_grid(ids, grid).flatten(1).sum(1), torch.full((5,), keep))


def test_masks_differ_per_sample_and_draw_and_cover_units_uniformly():
    grid, generator = (4, 4, 4), torch.Generator().manual_seed(1)
    ids = random_unit_mask(400, grid, 0.75, generator)
    assert len({tuple(row.tolist()) for row in ids}) == 400  # 64 choose 16 sets: repeats would be a bug
    assert not torch.equal(ids, random_unit_mask(400, grid, 0.75, generator))
    counts = torch.bincount(ids.flatten(), minlength=64).float()  # expected 400 * 16 / 64 = 100 each
    assert float(counts.min()) > 60 and float(counts.max()) < 140
    same = random_unit_mask(3, grid, 0.75, torch.Generator().manual_seed(7))
    assert torch.equal(same, random_unit_mask(3, grid, 0.75, torch.Generator().manual_seed(7)))


def test_bad_ratio_is_rejected():
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match="mask ratio"):
            num_visible_units((2, 2, 2), ratio)


def test_voxel_mask_is_aligned_to_units_and_token_coordinates_match_it():
    grid, unit, tokens_per_unit = (2, 3, 2), (16, 16, 16), (4, 4, 4)  # small config, stage 0: stride 4
    ids = random_unit_mask(2, grid, 0.5, torch.Generator().manual_seed(3))
    visible = visible_mask_grid(ids, grid)  # [B, 2, 3, 2]
    voxels = expand_units(visible, unit)  # [B, 32, 48, 32]
    assert voxels.shape == (2, 32, 48, 32)
    blocks = voxels.reshape(2, 2, 16, 3, 16, 2, 16)
    assert torch.equal(blocks.amin((2, 4, 6)), blocks.amax((2, 4, 6)))  # constant inside every unit
    assert torch.equal(blocks[:, :, 0, :, 0, :, 0], visible)

    batch, corner = unit_corners(ids, grid)
    coords, token_batch = UnitLayout(batch, corner, tokens_per_unit).token_positions()
    tokens_visible = expand_units(visible, tokens_per_unit)  # [B, 8, 12, 8] token grid
    want = {(b, *p) for b, *p in tokens_visible.nonzero().tolist()}
    got = {(b, *p) for b, p in zip(token_batch.tolist(), coords.tolist())}
    assert got == want and coords.shape[0] == len(want)  # every visible token exactly once
