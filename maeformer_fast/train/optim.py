"""Optimizers and learning-rate schedules shared by pretraining and fine-tuning."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, bias tables and tokens are not weight-decayed (as in MAE/Swin)."""
    return param.ndim <= 1 or "relative_position_bias_table" in name or "token" in name


def param_groups(
    model: nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None
) -> list[dict]:
    """Parameter groups with and without weight decay; ``lr_scale`` maps a name prefix to an lr factor
    (the longest matching prefix wins), used for layer-wise lr decay in fine-tuning."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0
        if lr_scale:
            matches = [p for p in lr_scale if name.startswith(p)]
            scale = lr_scale[max(matches, key=len)] if matches else 1.0
        key = (0.0 if no_decay(name, param) else weight_decay, scale)
        groups.setdefault(key, []).append(param)
    return [{"params": p, "weight_decay": wd, "lr_scale": s} for (wd, s), p in groups.items()]


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(
    name: str, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """``name`` over parameter ``groups``: "adamw" (with ``betas``) or "sgd" (Nesterov momentum 0.99,
    as nnU-Net). Plain momentum SGD is linear in the gradient, so a gradient of the wrong scale shows
    in its steps, where Adam's normalisation hides it."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.99, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """LR factor: linear warmup to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def poly(step: int, total: int, power: float = 0.9) -> float:
    """nnU-Net's polynomial decay factor (1 - step / total) ** power."""
    return (1.0 - min(step, total) / total) ** power


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Callable[[int], float]) -> LambdaLR:
    """LambdaLR applying ``schedule(step)`` times each group's ``lr_scale``."""
    factors = [functools.partial(_scaled, schedule, g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
    return LambdaLR(optimizer, factors)


def _scaled(schedule: Callable[[int], float], scale: float, step: int) -> float:
    return scale * schedule(step)
