"""The converged study's rules (when an arm has converged is ``train.plateau``): when pretraining has
flattened, how many mask units an encoder layout gives, and compute in steps and counted FLOPs (see
``study.converged``)."""

from __future__ import annotations

import csv
import math
import os
import platform
from pathlib import Path

import torch

from ..models.config import get_config


def loss_flattening(steps: list[int], losses: list[float], window: float = 0.1) -> dict[str, float]:
    """The masked-unit loss's relative drop between the mean over the steps in the second-to-last
    ``window`` of the run and the mean over the last ``window`` (by step, e.g. 80-90% vs 90-100%)."""
    last = steps[-1]
    earlier = [v for s, v in zip(steps, losses) if (1 - 2 * window) * last < s <= (1 - window) * last]
    final = [v for s, v in zip(steps, losses) if s > (1 - window) * last]
    if not earlier or not final:
        return {"earlier_mean": math.nan, "final_mean": math.nan, "relative_drop": math.nan}
    before, after = sum(earlier) / len(earlier), sum(final) / len(final)
    return {"earlier_mean": before, "final_mean": after, "relative_drop": (before - after) / before}


def read_loss_curve(log: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of a ``pretrain_log.csv``."""
    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def encoder_overrides(model: str, stages: int) -> dict:
    """Model overrides keeping the first ``stages`` stages of config ``model`` (total stride: the patch
    times the first ``stages - 1`` downsamplings); the config itself when ``stages`` is its own."""
    base = get_config(model)
    if not 2 <= stages <= base.num_stages:
        raise ValueError(f"encoder stages must be 2..{base.num_stages} for {model}, got {stages}")
    if stages == base.num_stages:
        return {}
    overrides: dict = {
        "depths": base.depths[:stages],
        "num_heads": base.num_heads[:stages],
        "window_sizes": base.window_sizes[:stages],
    }
    for name in ("down_kernels", "down_strides", "down_paddings"):
        if getattr(base, name) is not None:
            overrides[name] = getattr(base, name)[: stages - 1]
    if base.decoder_heads is not None:
        overrides["decoder_heads"] = base.decoder_heads[: stages - 1]
    return overrides


def mask_units(model: str, overrides: dict, crop: tuple[int, int, int]) -> int:
    """MAE mask units per sample: the crop divided by the encoder's total stride, per axis."""
    stride = get_config(model, **overrides).total_stride
    return math.prod(c // s for c, s in zip(crop, stride))


def scratch_max_steps(
    finetune_max: int, pretrain_steps: int, pretrain_flops: int, finetune_flops: int
) -> int:
    """Scratch's step maximum: the MAE arm's maximum plus the pretraining budget in whichever currency
    gives more steps -- optimizer steps (``pretrain_steps``) or counted FLOPs converted to fine-tuning
    steps (``ceil(pretrain_steps * pretrain_flops / finetune_flops)``) -- so scratch is never cut short."""
    in_flops = math.ceil(pretrain_steps * pretrain_flops / finetune_flops)
    return finetune_max + max(pretrain_steps, in_flops)


def matched_steps(flops: int, finetune_flops: int) -> int:
    """Fine-tuning steps a FLOP budget buys (whole steps, rounded down; integers, so a budget of an
    exact number of steps is not lost to rounding)."""
    return flops // finetune_flops


def best_within(curve: list[tuple[int, float]], max_step: int) -> float | None:
    """Best validation Dice of a curve up to and including ``max_step`` (None if none is that early)."""
    values = [dice for step, dice in curve if step <= max_step]
    return max(values) if values else None


def machine(device: str) -> str:
    """The machine a run used, in words: the GPU's name, or the CPU's model with its cores, the torch
    threads and the load average when the run ended (wall-clock on a shared CPU depends on it)."""
    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device if device != 'auto' else 'cuda'))}"
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu_model()} ({os.cpu_count()} cores), {torch.get_num_threads()} threads{load}"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor or architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
