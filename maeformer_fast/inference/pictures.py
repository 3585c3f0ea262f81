"""Pictures of a segmentation: three slices through the structure, the image in grey with the
reference outlined in green and the prediction in red, the case and its Dice in the title."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE_RGB = (0, 200, 0)  # green
PREDICTION_RGB = (230, 0, 0)  # red
TITLE_PX = 24  # the strip above the panels that holds the title
GAP_PX = 4  # black columns between the panels


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary of a 2D boolean mask: its pixels with a 4-neighbour outside it (or on the edge)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def slice_centre(image_shape: tuple[int, int, int], *masks: np.ndarray | None) -> tuple[int, int, int]:
    """(z, y, x) of the slices to show: the centre of mass of the first non-empty mask (reference before
    prediction), else the middle of the volume."""
    for mask in masks:
        if mask is not None and mask.any():
            return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    return tuple(s // 2 for s in image_shape)  # type: ignore[return-value]


def panels(image: np.ndarray, prediction: np.ndarray, reference: np.ndarray | None, scale: int) -> np.ndarray:
    """The picture's pixels (H, W, 3) uint8: the axial, coronal and sagittal slices through
    :func:`slice_centre`, each ``scale`` times enlarged (nearest), side by side with ``GAP_PX`` black
    columns between them. image: (Z, Y, X) float (windowed to its 1st-99th percentiles); prediction,
    reference: (Z, Y, X) integer labels, foreground > 0 (the reference drawn first, the prediction over
    it where both outline the same pixel)."""
    fg_pred = prediction > 0
    fg_ref = None if reference is None else reference > 0
    z, y, x = slice_centre(image.shape, fg_ref, fg_pred)
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    cuts = [np.s_[z, :, :], np.s_[:, y, :], np.s_[:, :, x]]
    height = max(grey[c].shape[0] for c in cuts) * scale
    pictures = []
    for cut in cuts:
        rgb = np.repeat((grey[cut] * 255).astype(np.uint8)[..., None], 3, axis=-1)
        for mask, colour in ((fg_ref, REFERENCE_RGB), (fg_pred, PREDICTION_RGB)):
            if mask is not None:
                rgb[outline(mask[cut])] = colour
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
        pictures.append(np.pad(rgb, ((0, height - rgb.shape[0]), (0, GAP_PX), (0, 0))))
    return np.concatenate(pictures, axis=1)[:, :-GAP_PX]


def segmentation_png(
    path: Path,
    image: np.ndarray,
    prediction: np.ndarray,
    reference: np.ndarray | None = None,
    title: str = "",
    scale: int | None = None,
) -> Path:
    """Write the picture of :func:`panels` to ``path`` with ``title`` in a strip above it: the panels'
    pixels land in the PNG as they are (``figimage``, no resampling), below ``TITLE_PX`` rows of
    title. ``scale`` (default: enough for ~200 pixels per panel side) enlarges small volumes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = scale or max(1, 200 // max(image.shape))
    pixels = panels(image, prediction, reference, scale)
    height, width = pixels.shape[:2]
    dpi = 100
    figure = plt.figure(figsize=(width / dpi, (height + TITLE_PX) / dpi), dpi=dpi, facecolor="black")
    figure.figimage(pixels, xo=0, yo=0, origin="upper")
    figure.text(0.5, 1 - TITLE_PX / 2 / (height + TITLE_PX), title, color="white", fontsize=9,
                ha="center", va="center")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, facecolor="black")
    plt.close(figure)
    return path


def dice_title(case: str, dice_by_class: dict[str, float]) -> str:
    """``case: Dice 1 0.812, 2 0.744`` (classes in order; ``n/a`` for a NaN)."""
    parts = [f"{k} {'n/a' if np.isnan(v) else f'{v:.3f}'}" for k, v in dice_by_class.items()]
    return f"{case}: Dice " + ", ".join(parts) if parts else case
