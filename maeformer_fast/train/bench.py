"""Training-step throughput on this machine (``maeformer bench``): sparse vs dense MAE pretraining and
fine-tuning, each the project's own training step on random inputs made on the device.

A step is ``Optimisation.accumulate`` + ``step`` as in the training loops: autocast, loss, backward,
gradient clipping, the optimizer and LR schedule, and the one host read of the loss per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models.config import get_config
from ..models.nnformer import NNFormer
from ..ops.masking import random_unit_mask
from ..ops.window_groups import Triple
from .distributed import DistInfo
from .loop import prepare_model
from .runtime import resolve_compile, resolve_precision, use_device

MASK_RATIO = 0.75


def training_step(
    task: str,
    model_name: str,
    crop: Triple,
    batch_size: int,
    precision: str,
    device: torch.device,
    mode: str = "sparse",
    model_overrides: dict[str, Any] | None = None,
    compile_model: bool = False,
    activation_checkpointing: bool = False,
    compile_backend: str = "inductor",
) -> tuple[Callable[[], float], int]:
    """A closure running one training step (returns its loss) and the voxels one step consumes.

    ``task``: "pretrain" (MAE, encoder ``mode`` "sparse" or "dense", a new mask every step) or
    ``"finetune"`` (segmentation, Dice + CE with deep supervision). ``precision``: resolved (fp32, bf16,
    fp16). Weights, optimizer state and the random (B, 1, *crop) inputs are made on ``device``.
    """
    from . import finetune as ft
    from . import pretrain as pt

    overrides = model_overrides or {}
    torch.manual_seed(0)
    with device:  # weights made on the device directly: the synapse model has 150 M parameters
        images = torch.randn(batch_size, 1, *crop)
        if task == "pretrain":
            config = pt.PretrainConfig(data="", out="", model=model_name, encoder=mode,
                                       model_overrides=overrides, steps=1000)  # fmt: skip
            model = pt.build_mae(config)
            optimisation = pt.build_optimisation(config, model, precision, device)
        elif task == "finetune":
            config = ft.FinetuneConfig(data="", out="", model=model_name, model_overrides=overrides,
                                       steps=1000)  # fmt: skip
            model = NNFormer(get_config(model_name, **overrides))
            optimisation = ft.build_optimisation(config, model, precision, device)
            labels = torch.randint(0, model.config.num_classes, (batch_size, *crop))
        else:
            raise ValueError(f"task must be 'pretrain' or 'finetune', got {task!r}")
    train_model = prepare_model(
        model, DistInfo(), device, compile_model, activation_checkpointing, compile_backend
    )
    unit_grid = model.encoder.unit_grid(crop)

    def loss_of(_micro: int) -> torch.Tensor:
        if task == "pretrain":
            ids = random_unit_mask(batch_size, unit_grid, MASK_RATIO, device=device)
            return pt.mae_loss(train_model, images, ids, precision, device)[0]
        return ft.segmentation_loss(train_model, images, labels, precision, device)

    def step() -> float:
        value = optimisation.accumulate(train_model, loss_of).item()
        optimisation.step()
        return value

    return step, math.prod(crop) * batch_size


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], float], device: torch.device, seconds: float, min_steps: int = 3) -> dict:
    """Steps for about ``seconds`` (at least ``min_steps``) after the caller's warm-up: steps,
    ms_per_step, steps_per_s and the last step's loss."""
    synchronize(device)
    steps, started = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - started < seconds:
        loss = step()
        steps += 1
    synchronize(device)
    elapsed = time.perf_counter() - started
    per_step = {"ms_per_step": 1e3 * elapsed / steps, "steps_per_s": steps / elapsed}
    return {"steps": steps, **per_step, "loss": loss}


def measure_step(
    step: Callable[[], float], voxels: int, device: torch.device, seconds: float, warmup_steps: int = 1
) -> dict:
    """Warm up (allocator, kernels, compilation), then time ``step``: warmup_s, :func:`time_steps`'
    figures, voxels_per_s and, on CUDA, peak_mib (max_memory_allocated since the caller's reset)."""
    started = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    synchronize(device)
    row = {"warmup_s": time.perf_counter() - started, **time_steps(step, device, seconds)}
    row["voxels_per_s"] = voxels * row["steps_per_s"]
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def bench(
    model: str = "small",
    crop_size: Sequence[int] | None = None,
    batch_size: int = 2,
    device: str = "auto",
    precision: str = "auto",
    seconds: float = 5.0,
    compile: bool | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> list[dict]:
    """Time sparse and dense MAE pretraining steps and fine-tuning steps of ``model``.

    Returns one row per case: task, mode, ms_per_step, steps_per_s, voxels_per_s, warmup_s and, on
    CUDA, peak_mib (torch.cuda.max_memory_allocated over the case).
    """
    torch_device = use_device(device)
    resolved = resolve_precision(precision, torch_device)
    compiled = resolve_compile(compile, torch_device)
    crop = tuple(crop_size or get_config(model, **(model_overrides or {})).crop_size)
    rows = []
    for task, mode in (("pretrain", "sparse"), ("pretrain", "dense"), ("finetune", "dense")):
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(torch_device)
        step, voxels = training_step(task, model, crop, batch_size, resolved, torch_device, mode,
                                     model_overrides, compiled)  # fmt: skip
        row = {"task": task, "mode": mode, "precision": resolved, "compiled": compiled}
        rows.append({**row, **measure_step(step, voxels, torch_device, seconds)})
        del step
    return rows
