"""MAE pretraining targets: ``patchify``/``unpatchify`` and ``forward_loss`` against plain Python loops.

The references are loops over voxels and units written here (not the library's functions): a mask
unit's values are its voxels in C order, channel fastest (facebookresearch/mae's ``patchify``), units
in C order over the unit grid (the order of ``ops.masking``'s flat unit ids), and the loss is the mean
over masked units of each unit's mean squared error, optionally against the unit's values normalised
by their mean and unbiased variance (MAE's ``norm_pix_loss``, eps 1e-6).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from maeformer_fast.models import get_config
from maeformer_fast.models.mae import MaskedAutoencoder, patchify, unpatchify

# A unit of 2x4x8 voxels (every axis a different size, so that swapped axes show), two channels: patch
# (2, 2, 2), then downsamplings of (1, 2, 2) and (1, 1, 2). Tiny widths: only the loss runs.
UNIT = (2, 4, 8)
CONFIG = dict(in_channels=2, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 1),
              window_sizes=((2, 2, 2),) * 3, down_strides=((1, 2, 2), (1, 1, 2)))  # fmt: skip
UNIT_GRID = (2, 3, 2)  # 12 units; images of 4x12x16 voxels
# Visible units per sample (flat C-order ids over UNIT_GRID, as ``ops.masking`` draws them), different
# per sample; 9 masked units each.
VISIBLE = [[0, 5, 7], [1, 2, 10]]


def loop_patchify(images: Tensor, unit: tuple[int, int, int]) -> list[list[list[float]]]:
    """(B, C, Z, Y, X) -> [b][unit][value]: every voxel put at its unit (C order over the unit grid)
    and its place in the unit ((dz, dy, dx) in C order, then channel), one voxel at a time."""
    b_size, channels, *size = images.shape
    grid = [s // u for s, u in zip(size, unit)]
    values = images.tolist()
    out = [[[0.0] * (math.prod(unit) * channels) for _ in range(math.prod(grid))] for _ in range(b_size)]
    for b, c, z, y, x in itertools.product(range(b_size), range(channels), *map(range, size)):
        n = ((z // unit[0]) * grid[1] + y // unit[1]) * grid[2] + x // unit[2]
        k = (((z % unit[0]) * unit[1] + y % unit[1]) * unit[2] + x % unit[2]) * channels + c
        out[b][n][k] = values[b][c][z][y][x]
    return out


def loop_normalise(unit_values: list[float]) -> list[float]:
    """One unit's values minus their mean, over sqrt(unbiased variance + 1e-6)."""
    n = len(unit_values)
    mean = sum(unit_values) / n
    var = sum((v - mean) ** 2 for v in unit_values) / (n - 1)
    return [(v - mean) / math.sqrt(var + 1e-6) for v in unit_values]


def loop_loss(images: Tensor, prediction: Tensor, visible: list[list[int]], norm: bool) -> float:
    """Mean over every masked unit of the batch of the unit's mean squared error, in float64."""
    targets = loop_patchify(images, UNIT)
    predicted = prediction.tolist()
    per_unit = []
    for b, units in enumerate(targets):
        for n, target in enumerate(units):
            if n in visible[b]:
                continue
            target = loop_normalise(target) if norm else target
            per_unit.append(sum((p - t) ** 2 for p, t in zip(predicted[b][n], target)) / len(target))
    return sum(per_unit) / len(per_unit)


def images_and_model(norm: bool) -> tuple[Tensor, MaskedAutoencoder]:
    """Images (2, 2, 4, 12, 16) and an MAE whose mask unit is ``UNIT`` (only its loss is used)."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(
        get_config("small", **CONFIG), decoder_dim=8, decoder_heads=1, norm_pix_loss=norm
    )
    assert model.config.total_stride == UNIT
    # Per-unit offsets and scales, so that normalising a unit changes its values.
    images = torch.randn(2, 2, *(g * u for g, u in zip(UNIT_GRID, UNIT))) * 3.0 + 1.5
    return images, model


def test_patchify_and_unpatchify_match_a_loop_over_voxels():
    """Exact (data movement only), at a 2x4x3 unit, 3 channels, a 2x3x2 unit grid, batch 2.

    Mutation seen failing: ``permute(0, 2, 4, 6, 3, 5, 7, 1)`` -> ``(0, 2, 4, 6, 1, 3, 5, 7)`` in
    ``patchify`` (channel first within a unit: not equal) and ``permute(0, 7, 1, 4, 2, 5, 3, 6)`` ->
    ``(0, 7, 1, 4, 3, 6, 2, 5)`` in ``unpatchify`` (y and x unit axes swapped: not equal).
    """
    unit, grid, channels = (2, 4, 3), (2, 3, 2), 3
    torch.manual_seed(0)
    images = torch.randn(2, channels, *(g * u for g, u in zip(grid, unit)))
    expected = torch.tensor(loop_patchify(images, unit))
    assert expected.shape == (2, 12, 24 * channels)
    assert torch.equal(patchify(images, unit), expected)
    # unpatchify: random rows, each voxel read back from its unit and place by the same loop.
    patches = torch.randn(2, 12, 24 * channels)
    rebuilt = unpatchify(patches, unit, grid, channels)
    assert rebuilt.shape == images.shape
    assert torch.equal(torch.tensor(loop_patchify(rebuilt, unit)), patches)


@pytest.mark.parametrize("norm", [False, True])
def test_loss_scores_the_masked_units_only(norm):
    """Predictions off by 0.5 on every value of masked units and by 3 on visible ones: the loss is
    0.25 (9 if the visible units were scored), with and without per-unit normalised targets. The
    target is built by the loops here, so a unit order of ``patchify`` other than the mask ids' (or
    another order within a unit) puts the offsets on the wrong units. Measured error 0.0; tolerance
    1e-6 (float32 rounding).

    Mutation seen failing: ``masked = ~visible_mask_grid(...)`` -> ``visible_mask_grid(...)`` (loss
    9.0), ``patchify``'s ``permute(0, 2, 4, 6, 3, 5, 7, 1)`` -> ``(0, 6, 4, 2, 3, 5, 7, 1)`` (units in
    x-major order: 9.6, normalised 1.26) and -> ``(0, 2, 4, 6, 1, 3, 5, 7)`` (channel first within a
    unit: 18.7, normalised 2.23).
    """
    images, model = images_and_model(norm)
    target = [[loop_normalise(u) if norm else u for u in units] for units in loop_patchify(images, UNIT)]
    visible = torch.zeros(2, 12, 1, dtype=torch.bool)
    for b, ids in enumerate(VISIBLE):
        visible[b, ids] = True
    prediction = torch.tensor(target) + torch.where(visible, 3.0, 0.5)
    loss = model.forward_loss(images, prediction, torch.tensor(VISIBLE))
    assert abs(loss.item() - 0.25) < 1e-6, loss.item()


@pytest.mark.parametrize("norm", [False, True])
def test_loss_equals_the_masked_unit_mean_of_a_loop(norm):
    """Random predictions: the loss equals the loop's mean over the batch's 18 masked units of the
    per-unit MSE, to 1e-5 relative (measured up to 1.2e-7 over five seeds: float32 against the loop's
    float64).

    Mutation seen failing (relative error): ``target.var(-1, keepdim=True)`` -> ``target.var(-1,
    keepdim=True, unbiased=False)`` (normalised: 3.9e-3), ``(var + 1e-6).sqrt()`` -> ``var + 1e-6``
    (normalised: 0.45), ``target.mean(-1, ...)`` -> ``target.mean(1, ...)`` (the mean over units, not
    over a unit's values; normalised: 0.033), dropping the ``~`` (0.09, normalised 0.054) and
    ``.square().mean(-1)`` -> ``.square().sum(-1)`` (x128).
    """
    images, model = images_and_model(norm)
    prediction = torch.randn(2, 12, math.prod(UNIT) * 2)
    loss = model.forward_loss(images, prediction, torch.tensor(VISIBLE)).item()
    expected = loop_loss(images, prediction, VISIBLE, norm)
    assert abs(loss - expected) <= 1e-5 * expected, (loss, expected)
