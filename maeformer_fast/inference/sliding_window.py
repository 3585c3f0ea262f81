"""Sliding-window inference with Gaussian weighting and optional mirror test-time augmentation."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..device import autocast


def gaussian_importance(size: tuple[int, ...], sigma_scale: float = 0.125, device=None) -> Tensor:
    """(Z, Y, X) Gaussian weights peaking at the window centre (sigma = size / 8 per axis), min > 0."""
    axes = []
    for n in size:
        coords = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (coords / max(n * sigma_scale, 1e-6)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    return weights.clamp(min=weights[weights > 0].min().item())


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets along one axis so that windows cover [0, size) with about ``overlap`` overlap."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    count = math.ceil((size - window) / step) + 1
    return [round(i * (size - window) / (count - 1)) for i in range(count)]


@torch.no_grad()
def sliding_window_predict(
    model: nn.Module,
    image: Tensor,
    window: tuple[int, int, int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 4,
    mirror: bool = False,
    precision: str = "fp32",
) -> Tensor:
    """Class probabilities (K, Z, Y, X) of one volume (C, Z, Y, X).

    Windows of ``window`` voxels step by ``(1 - overlap)`` of their size; each prediction is weighted by
    a Gaussian so window borders count less. Volumes smaller than the window are zero-padded and the
    result cropped back. ``mirror`` averages the 8 axis-flipped predictions.

    A model that compiles one graph per input shape (``static_shapes`` true, as
    ``train.loop.CompiledModel``) gets every batch at ``batch_size`` windows, the last one filled up
    with zero windows whose predictions are dropped: one graph (on CUDA, one captured CUDA graph) per
    window shape, whatever the volume's size.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1) (a share of the window), got {overlap}")
    device = image.device
    size = tuple(image.shape[1:])
    pads = [max(w - s, 0) for w, s in zip(window, size)]
    padded = F.pad(image, (0, pads[2], 0, pads[1], 0, pads[0]))
    full = tuple(padded.shape[1:])
    importance = gaussian_importance(window, device=device)
    scores = torch.zeros(num_classes, *full, device=device)
    weight = torch.zeros(full, device=device)
    starts = list(itertools.product(*[window_starts(n, w, overlap) for n, w in zip(full, window)]))
    flips = [dims for r in range(4) for dims in itertools.combinations((2, 3, 4), r)] if mirror else [()]
    static = getattr(model, "static_shapes", False)
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        crops = torch.stack(
            [padded[:, z : z + window[0], y : y + window[1], x : x + window[2]] for z, y, x in chunk]
        )
        if static and len(chunk) < batch_size:
            crops = F.pad(crops, (0, 0, 0, 0, 0, 0, 0, 0, 0, batch_size - len(chunk)))
        probs = 0
        for dims in flips:
            flipped = crops.flip(dims) if dims else crops
            with autocast(precision, device):
                logits = model(flipped)
            out = logits.float().softmax(1)
            probs = probs + (out.flip(dims) if dims else out)
        probs = probs / len(flips)
        for (z, y, x), p in zip(chunk, probs):
            region = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
            scores[(slice(None), *region)] += p * importance
            weight[region] += importance
    return scores.div_(weight)[:, : size[0], : size[1], : size[2]]  # in place: (K, Z, Y, X) can be GiBs
