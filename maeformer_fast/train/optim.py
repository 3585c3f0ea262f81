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
    name: str,
    groups: list[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    tensor_lr: bool = False,
) -> torch.optim.Optimizer:
    """``name`` over parameter ``groups``: "adamw" (with ``betas``) or "sgd" (Nesterov momentum 0.99,
    as nnU-Net). Plain momentum SGD is linear in the gradient, so a gradient of the wrong scale shows
    in its steps, where Adam's normalisation hides it.

    ``tensor_lr`` (for a compiled optimizer step, see ``Optimisation.compile_step``): each group's
    learning rate is its own 0-dim tensor on the parameters' device, which the LR schedule fills in
    place -- a float that changes every step would recompile the step, and a CPU tensor would keep
    it off CUDA graphs. AdamW is then also ``capturable`` on CUDA (its step counts stay on the device,
    no host read). Not ``fused``: torch.compile refuses to trace the fused kernels (torch 2.13 wraps
    ``_fused_adamw`` in ``torch.compiler.disable``), and inductor fuses the foreach step itself.
    Without ``tensor_lr`` the optimizer is the plain float-lr one.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    options: dict = {}
    if tensor_lr:
        device = groups[0]["params"][0].device
        # One tensor per group: a shared default tensor would make the groups' lrs one value. The
        # schedule's base lr ("initial_lr") stays the exact float, not the tensor's float32 rounding.
        groups = [{**g, "lr": torch.tensor(lr * 1.0, device=device), "initial_lr": lr} for g in groups]
        options = {"capturable": device.type == "cuda"} if name == "adamw" else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.99, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **options)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """LR factor: linear warmup to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_constant(step: int, warmup: int) -> float:
    """LR factor: linear warmup to 1 over ``warmup`` steps, then 1 -- for runs whose length a stopping
    rule decides, where a decay over the maximum would tie the lr to that maximum."""
    return (step + 1) / warmup if step < warmup else 1.0


def poly(step: int, total: int, power: float = 0.9) -> float:
    """nnU-Net's polynomial decay factor (1 - step / total) ** power."""
    return (1.0 - min(step, total) / total) ** power


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Callable[[int], float]) -> LambdaLR:
    """LambdaLR applying ``schedule(step)`` times each group's ``lr_scale``; tensor learning rates are
    filled in place (torch 2.13's LambdaLR does, :class:`FloatLambdaLR` makes sure), and the
    scheduler reports floats either way."""
    for group in optimizer.param_groups:  # float base lrs: a tensor one would turn float lrs into tensors
        group.setdefault("initial_lr", float(group["lr"]))
    factors = [functools.partial(_scaled, schedule, g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
    return FloatLambdaLR(optimizer, factors)


class FloatLambdaLR(LambdaLR):
    """LambdaLR that keeps tensor learning rates the same tensors and reports floats."""

    def step(self, epoch: int | None = None) -> None:
        tensors = [
            g["lr"] if isinstance(g["lr"], torch.Tensor) else None for g in self.optimizer.param_groups
        ]
        super().step(epoch)
        for group, tensor in zip(self.optimizer.param_groups, tensors):
            if tensor is not None and group["lr"] is not tensor:  # torch versions that assign, not fill
                group["lr"] = tensor.fill_(float(group["lr"]))

    def get_last_lr(self) -> list[float]:
        """The learning rates of the last step, computed as LambdaLR sets them (base lr times the
        factor): reading them back from device tensors would wait for the device at every log line."""
        return [base * factor(self.last_epoch) for factor, base in zip(self.lr_lambdas, self.base_lrs)]


def _scaled(schedule: Callable[[int], float], scale: float, step: int) -> float:
    return scale * schedule(step)


# Group settings that say how an optimizer runs, not what it learned: a resumed run keeps its own.
RUNTIME_OPTIONS = ("capturable", "foreach", "fused", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``state`` (an optimizer ``state_dict``) into ``optimizer``, which keeps its own way of
    running: its learning rates stay floats or its own tensors (filled with the loaded values), and
    its runtime options (capturable, ...) stay -- so ``load_state_dict`` places AdamW's step counts
    as they want (capturable: float32 on the parameters' device).

    So a checkpoint of a float-lr run resumes into a tensor-lr (compiled) run and back; plain
    ``load_state_dict`` would take the saved groups' lr types and options over.
    """
    if len(state["param_groups"]) != len(optimizer.param_groups):  # load_state_dict's own check, kept
        raise ValueError(
            f"the checkpoint's optimizer has {len(state['param_groups'])} parameter groups, this run's "
            f"{len(optimizer.param_groups)}: resume with the settings it was trained with"
        )
    own = [{k: g[k] for k in ("lr", *RUNTIME_OPTIONS) if k in g} for g in optimizer.param_groups]
    saved_groups = [{**saved, **{k: v for k, v in mine.items() if k != "lr"}}
                    for saved, mine in zip(state["param_groups"], own)]  # fmt: skip
    optimizer.load_state_dict({**state, "param_groups": saved_groups})
    for group, mine in zip(optimizer.param_groups, own):
        loaded = float(group["lr"])
        group["lr"] = mine["lr"].fill_(loaded) if isinstance(mine["lr"], torch.Tensor) else loaded
