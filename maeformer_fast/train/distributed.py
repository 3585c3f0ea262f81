"""torchrun integration: process group setup, DDP wrapping, rank-0-only side effects."""

from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# Rank 0 validates, tests and writes checkpoints alone while the other ranks wait in their next
# collective; NCCL's default of 10 minutes would kill a run whose validation takes longer.
TIMEOUT_ENV = "MAEFORMER_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 2 * 3600


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); single process otherwise.

    Reads torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT); a group that is already
    initialised (by the caller, or an earlier run in the same process) is reused.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend=backend, timeout=timeout)
        # The group outlives one pretrain()/finetune() call (a study runs several in one process), so
        # it is torn down at exit; NCCL warns about leaked resources otherwise.
        atexit.register(_destroy)
    return DistInfo(dist.get_rank(), dist.get_world_size())


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel when running under torchrun with several processes.

    Every trainable parameter must take part in every step's loss (freeze the others): unused-parameter
    detection would cost a graph traversal per step.
    """
    if not info.enabled:
        return model
    # The block-form sparse convolution returns weight gradients of a (C_out, 1, 3, 3, 3) weight with
    # a different (equally valid) stride on the size-1 axis; DDP copies them into its bucket, correctly.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (gradients stay local: a non-final micro-step of gradient accumulation) when
    ``skip`` and ``model`` is DDP; a no-op otherwise."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a scalar tensor over ranks (NaN on any rank makes the mean NaN on all)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


def broadcast_from_main(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not info.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
