"""What every loader shares: a batch moved to its device and finished there (augmentation, masks)."""

from __future__ import annotations

from typing import Any

import torch

from ..ops.masking import random_unit_mask
from ..seeds import step_generator
from ..types import Triple
from .augment import apply_flips, apply_intensity
from .sampling import BatchPlan, CropSampler


def augment_batch(
    image: torch.Tensor, label: torch.Tensor | None, plan: BatchPlan, done: str = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flips and intensity augmentation of a batch (image (B, C, Z, Y, X), label (B, Z, Y, X)) on its
    device, with the parameters of ``plan``, less what is ``done`` already: "none", "flips" (the
    resident gather) or "flips+brightness" (the DALI pipeline)."""
    intensity = torch.from_numpy(plan.intensity)
    if done == "flips+brightness":
        # The pipeline multiplied by the brightness before any noise: x * b + n * b = (x + n) * b, the
        # loaders' (nnU-Net's) order, with the noise's std scaled by b.
        intensity = intensity.clone()
        intensity[:, 3] *= intensity[:, 0]
        intensity[:, 0] = 1.0
    elif done == "none":
        image, label = apply_flips(image, label, torch.from_numpy(plan.flips))
    return apply_intensity(image, intensity, torch.from_numpy(plan.noise_seeds)), label


def finish_batch(
    image: torch.Tensor,
    label: torch.Tensor | None,
    plan: BatchPlan,
    sampler: CropSampler,
    device: torch.device,
    step: int,
    done: str = "none",
    mask: tuple[Triple, float] | None = None,
) -> dict[str, Any]:
    """Move a batch to ``device`` and finish its augmentation there: image (B, C, Z, Y, X) float32,
    label (B, Z, Y, X) any integer dtype -> int64. ``done``: what was applied already -- "none",
    "flips" (resident gather), "flips+brightness" (DALI pipeline) or "all" (CPU loader workers).
    ``mask`` = (unit grid, ratio): add the step's visible units (B, K) as ``"visible_ids"``."""
    image = image.to(device, non_blocking=True)
    label = None if label is None else label.to(device, non_blocking=True).long()
    if sampler.augment and done != "all":
        image, label = augment_batch(image, label, plan, done)
    batch: dict[str, Any] = {
        "image": image,
        "case_ids": [sampler.case_ids[c] for c in plan.cases.tolist()],
        "step": step,
    }
    if label is not None:
        batch["label"] = label
    if mask is not None:
        # Seeded by (seed, rank, step) on the device, exactly as pretraining drew masks itself.
        generator = step_generator(device, sampler.seed, sampler.rank, step, "mask")
        batch["visible_ids"] = random_unit_mask(len(plan.cases), mask[0], mask[1], generator, device)
    return batch
