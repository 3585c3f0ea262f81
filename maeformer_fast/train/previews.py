"""Reconstruction previews: PNG slices of input, masked input and MAE reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_reconstruction_png(
    path: Path, image: torch.Tensor, visible: torch.Tensor, reconstruction: torch.Tensor
) -> None:
    """Write the middle axial slice of one sample as three panels.

    image, reconstruction: (C, Z, Y, X) in input units (channel 0 is shown); visible: (Z, Y, X) bool.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = image.shape[1] // 2
    panels = {
        "input": image[0, z],
        "visible (masked = 0)": image[0, z] * visible[z],
        "reconstruction": reconstruction[0, z],
    }
    lo, hi = np.percentile(image[0, z].float().cpu().numpy(), [1, 99])
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for axis, (title, data) in zip(axes, panels.items()):
        axis.imshow(data.float().cpu().numpy(), cmap="gray", vmin=lo, vmax=hi)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
