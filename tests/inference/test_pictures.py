"""Segmentation pictures (``maeformer predict --png``, ``evaluate --png``, the demo): the PNG's size and
its colours where the outlines are, read back from the file, on a tiny hand-made volume."""

from __future__ import annotations

import numpy as np
from matplotlib.image import imread

from maeformer_fast.inference.pictures import (
    GAP_PX,
    PREDICTION_RGB,
    REFERENCE_RGB,
    TITLE_PX,
    dice_title,
    outline,
    segmentation_png,
)


def test_outline_of_a_square_is_its_border():
    """A 4x4 square in a 6x6 image: its 12 border pixels, not its 4 inner ones (hand-counted). Mutation
    seen failing: ``outline`` returning the inside (``mask & inner``)."""
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    edge = outline(mask)
    assert edge.sum() == 12 and not edge[2:4, 2:4].any() and edge[1, 1:5].all()


def test_png_size_and_outline_colours(tmp_path):
    """Volume (Z, Y, X) = (6, 8, 10), scale 3: panels axial (8x10), coronal (6x10), sagittal (6x8),
    height 8*3 = 24, width (10+10+8)*3 + 2 gaps, the title strip above. Reference cube z 1-4, y 2-5,
    x 2-5; prediction the same cube moved +3 in x. The axial slice goes through the reference's centre
    of mass (z 2.5, rounded half-to-even to 2): the reference's corner (y 2, x 2) is green, the
    prediction's far corner (y 5, x 8) red, the inside (y 3, x 3) and a corner of the image grey, at
    the value windowed to the volume's 1st-99th percentiles. Mutations caught: the colours swapped;
    the panels scaled by the wrong factor (the size); the outline of the inside instead of the border
    (the corner not green); the window taken from the slice instead of the volume (the grey level)."""
    image = np.linspace(0, 1, 6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10)
    reference = np.zeros((6, 8, 10), np.uint8)
    reference[1:5, 2:6, 2:6] = 1
    prediction = np.roll(reference, 3, axis=2)
    path = segmentation_png(
        tmp_path / "case.png", image, prediction, reference, "case: Dice 1 0.250", scale=3
    )
    picture = (imread(path)[..., :3] * 255).round().astype(int)
    assert picture.shape[:2] == (TITLE_PX + 8 * 3, (10 + 10 + 8) * 3 + 2 * GAP_PX)

    def axial(y: int, x: int) -> tuple[int, ...]:
        return tuple(picture[TITLE_PX + 3 * y + 1, 3 * x + 1])

    assert axial(2, 2) == REFERENCE_RGB
    assert axial(5, 8) == PREDICTION_RGB
    r, g, b = axial(3, 3)
    assert r == g == b
    lo, hi = np.percentile(image, [1, 99])
    level = int(255 * (image[2, 0, 0] - lo) / (hi - lo))  # the uint8 conversion truncates
    assert axial(0, 0) == (level, level, level)


def test_dice_title():
    """Mutation seen failing: a NaN Dice printed as ``nan`` instead of ``n/a``."""
    assert (
        dice_title("hippocampus_001", {"1": 0.8123, "2": float("nan")})
        == "hippocampus_001: Dice 1 0.812, 2 n/a"
    )
