"""Scoring a segmentation model on cached cases (validation and test splits)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.cache import open_case
from .metrics import per_class_scores
from .pictures import dice_title, segmentation_png
from .sliding_window import sliding_window_predict


def predict_case(model: nn.Module, image: np.ndarray, crop, num_classes: int, device, precision: str,
                 overlap: float = 0.5, batch_size: int = 4, mirror: bool = False) -> np.ndarray:  # fmt: skip
    """Label map (Z, Y, X) uint8 of a preprocessed image (C, Z, Y, X)."""
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)  # copy: caches are read-only
    probs = sliding_window_predict(
        model, tensor, tuple(crop), num_classes, overlap, batch_size, mirror, precision
    )
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


def score_cases(
    model: nn.Module,
    cache: str | Path,
    case_ids: list[str],
    crop,
    num_classes: int,
    spacing,
    device,
    precision: str,
    with_hd95: bool = False,
    overlap: float = 0.5,
    mirror: bool = False,
    pictures: Path | None = None,
) -> dict[str, dict[int, dict[str, float]]]:
    """{case: {class: {"dice", "hd95"}}} over foreground classes, computed in preprocessed space; with
    ``pictures``, one PNG per case there (``pictures.segmentation_png`` of the first channel, Dice in
    the title)."""
    was_training = model.training
    model.eval()
    results = {}
    for case in case_ids:
        image, label = open_case(cache, case, labeled=True)
        prediction = predict_case(model, image, crop, num_classes, device, precision, overlap, mirror=mirror)
        results[case] = per_class_scores(
            prediction, label, list(range(1, num_classes)), tuple(spacing), with_hd95
        )
        if pictures is not None:
            title = dice_title(case, {str(c): score["dice"] for c, score in results[case].items()})
            segmentation_png(pictures / f"{case}.png", np.asarray(image[0], np.float32),
                             np.asarray(prediction), np.asarray(label), title)  # fmt: skip
    model.train(was_training)
    return results


def summarise(scores: dict[str, dict[int, dict[str, float]]], metric: str = "dice") -> dict[str, float]:
    """Mean over cases per class and over classes ("mean"); NaNs (undefined HD95) are left out."""
    classes = sorted({c for per_case in scores.values() for c in per_case})
    summary = {}
    for c in classes:
        values = [per_case[c][metric] for per_case in scores.values() if not math.isnan(per_case[c][metric])]
        summary[str(c)] = float(np.mean(values)) if values else float("nan")
    finite = [v for v in summary.values() if not math.isnan(v)]
    summary["mean"] = float(np.mean(finite)) if finite else float("nan")
    return summary
