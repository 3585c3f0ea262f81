"""The fine-tuning recipes' optimizer and per-step learning-rate schedule inside nnU-Net's epoch loop."""

from __future__ import annotations

import functools
import warnings

import torch
from torch.optim.lr_scheduler import LRScheduler

from ...models.nnformer import NNFormer
from ...train.finetune import layer_lr_scales
from ...train.optim import make_optimizer, make_scheduler, param_groups, warmup_constant, warmup_cosine


class IterationScheduler:
    """A per-step LR scheduler driven through nnU-Net's per-epoch call.

    nnU-Net calls ``lr_scheduler.step(epoch)`` once at the start of every epoch (its poly schedule
    counts epochs); the recipes count optimizer steps (one per nnU-Net iteration). There the wrapped
    scheduler is placed at the epoch's first step, ``epoch * iterations_per_epoch``; ``step()`` without
    an epoch (the trainer's ``train_step``, after each optimizer step) advances it by one. In an
    uninterrupted run the placement is a no-op; a run resumed with ``--c``, which restores nnU-Net's
    epoch but no scheduler, continues the schedule where it stopped.
    """

    def __init__(self, scheduler: LRScheduler, iterations_per_epoch: int) -> None:
        self.scheduler = scheduler
        self.iterations_per_epoch = iterations_per_epoch

    @property
    def iteration(self) -> int:
        """The optimizer step whose learning rates are set (from 0)."""
        return self.scheduler.last_epoch  # LambdaLR's step counter, despite its name

    def step(self, epoch: int | None = None) -> None:
        if epoch is None:
            self.scheduler.step()
            return
        first = epoch * self.iterations_per_epoch
        if self.scheduler.last_epoch != first:
            self.scheduler.last_epoch = first - 1
            with warnings.catch_warnings():  # placing, not the step after an optimizer step torch expects
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
                self.scheduler.step()


def recipe_optimizer(
    network: NNFormer,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    warmup_steps: int,
    lr_schedule: str,
    total_steps: int,
    iterations_per_epoch: int,
) -> tuple[torch.optim.Optimizer, IterationScheduler]:
    """AdamW over ``network``'s parameters (no decay on norms, biases and bias tables; encoder stages
    at ``layer_decay`` powers of ``lr``, as ``maeformer finetune``), with a linear warmup of
    ``warmup_steps`` and then, for ``lr_schedule`` "constant", the peak ``lr``, or for "decay" a cosine
    to 0 at ``total_steps``.

    The groups at the full learning rate (decoder and heads) come first: nnU-Net logs group 0's lr.
    """
    if lr_schedule not in ("constant", "decay"):
        raise ValueError(f"lr_schedule must be 'constant' or 'decay', got {lr_schedule!r}")
    scales = layer_lr_scales(network, layer_decay) if layer_decay != 1.0 else None
    groups = sorted(param_groups(network, weight_decay, scales), key=lambda group: -group["lr_scale"])
    optimizer = make_optimizer("adamw", groups, lr)
    if lr_schedule == "constant":
        schedule = functools.partial(warmup_constant, warmup=warmup_steps)
    else:
        schedule = functools.partial(warmup_cosine, total=total_steps, warmup=warmup_steps)
    return optimizer, IterationScheduler(make_scheduler(optimizer, schedule), iterations_per_epoch)
