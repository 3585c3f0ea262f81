"""Segmentation loss: soft Dice + cross-entropy, with deep supervision (nnU-Net / nnFormer)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dice_ce_loss(logits: Tensor, labels: Tensor, smooth: float = 1e-5) -> Tensor:
    """logits (B, K, Z, Y, X), labels (B, Z, Y, X) int64 -> CE + (1 - mean foreground soft Dice).

    Dice is computed over the whole batch per class (nnU-Net's batch Dice) and averaged over the
    foreground classes, so an absent class in one crop does not dominate the loss.
    """
    ce = F.cross_entropy(logits.float(), labels)
    probs = logits.float().softmax(1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probs.dtype)
    dims = (0, 2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return ce + (1 - dice[1:].mean())


def deep_supervision_loss(outputs: Tensor | list[Tensor], labels: Tensor) -> Tensor:
    """Weighted loss over [full, 1/2, 1/4, ...] outputs with weights proportional to 4, 2, 1 (4/7, 2/7,
    1/7 for three heads); labels are nearest-downsampled to each output's size."""
    if isinstance(outputs, Tensor):
        return dice_ce_loss(outputs, labels)
    weights = [2.0 ** (len(outputs) - 1 - i) for i in range(len(outputs))]
    total = 0.0
    for weight, logits in zip(weights, outputs):
        target = labels
        if logits.shape[2:] != labels.shape[1:]:
            target = F.interpolate(labels[:, None].float(), size=logits.shape[2:], mode="nearest")[
                :, 0
            ].long()
        total = total + weight * dice_ce_loss(logits, target)
    return total / sum(weights)
