"""Pieces of the training loop shared by pretraining and fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointManager
from .distributed import DistInfo, barrier, init_distributed
from .runtime import pick_device, resolve_precision


@dataclass(frozen=True)
class RunSetup:
    """Where and how a run executes: device, resolved precision, ranks, output folder, data cache."""

    device: torch.device
    precision: str
    dist: DistInfo
    out: Path
    cache: Path


def setup_run(
    data: str, out: str, cache_dir: str | None, device: str, precision: str, deterministic: bool
) -> RunSetup:
    """Pick the device, join torchrun's process group, create ``out`` and build (rank 0) or wait for
    the preprocessing cache of ``data``."""
    from ..data import ensure_preprocessed

    torch_device = pick_device(device)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    dist_info = init_distributed(torch_device)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    cache = ensure_preprocessed(data, cache_dir) if dist_info.is_main else None
    barrier(dist_info)
    cache = cache or ensure_preprocessed(data, cache_dir)
    return RunSetup(
        torch_device, resolve_precision(precision, torch_device), dist_info, out_path, Path(cache)
    )


@dataclass
class Optimisation:
    """Optimizer, LR schedule and gradient scaler of a run, stepped and checkpointed together."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    grad_clip: float | None = None

    def step(self, loss: torch.Tensor) -> None:
        """Backward, unscale, clip, optimizer and scheduler step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, manager: CheckpointManager, step: int, meta: dict[str, Any]) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        return manager.save(step, self.model, state, meta)

    def resume(self, manager: CheckpointManager) -> tuple[int, dict[str, Any]] | None:
        """Load the newest checkpoint into model and optimisation state: (step, meta), or None."""
        latest = manager.latest()
        if latest is None:
            return None
        state, meta = manager.load(latest, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return meta["step"], meta
