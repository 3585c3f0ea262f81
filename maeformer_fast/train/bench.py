"""Training-step throughput on this machine (``maeformer bench``): sparse vs dense MAE pretraining and
fine-tuning, each the project's own training step on random inputs made on the device.

A step is ``Optimisation.accumulate`` + ``step`` as in the training loops: autocast, loss, backward,
gradient clipping, the optimizer and LR schedule, and the one host read of the loss per step.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
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
    compile_mode: str | None = "auto",
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
        model, DistInfo(), device, compile_model, activation_checkpointing, compile_backend, compile_mode
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


def loader_iterators(
    cache: Path, crop: Triple, batch_size: int, device: torch.device, mask: tuple[Triple, float], workers: int
) -> dict[str, Iterator[dict[str, Any]]]:
    """The loaders ``maeformer bench --loader`` compares, each giving unlabeled MAE batches (crops,
    flips, intensity augmentation, masks) of ``cache`` on ``device``: worker processes reading the
    memory-mapped cache, DALI (when installed), the volumes held in device memory, and on CUDA the
    volumes held in host memory with a prefetching copy."""
    from ..data.loaders import make_loader, make_sampler
    from ..data.resident import image_storage_dtype, resident_batches

    def loader(**kwargs: Any) -> Iterator[dict[str, Any]]:
        return make_loader(cache, crop, batch_size, labeled=False, device=device, num_workers=workers,
                           mask=mask, **kwargs)  # fmt: skip

    found = {"workers": loader(backend="torch")}
    if importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None:
        found["dali"] = loader(backend="dali")
    found["resident"] = loader(data_on_device="on")
    if device.type == "cuda":
        sampler = make_sampler(cache, crop, batch_size, labeled=False)
        dtype = image_storage_dtype(sampler, device)
        found["host-staged"] = resident_batches(sampler, False, device, 0, True, dtype, mask)
    return found


def bench_loaders(
    data: str,
    model: str = "small",
    crop_size: Sequence[int] | None = None,
    batch_size: int = 2,
    device: str = "auto",
    precision: str = "auto",
    seconds: float = 5.0,
    compile: bool | None = None,
    num_workers: int = 2,
    rounds: int = 3,
) -> list[dict]:
    """Crops/s of each loader of :func:`loader_iterators` on ``data`` (a dataset or cache) and the
    crops/s the sparse MAE pretraining step of ``model`` consumes on the same device.

    The loaders are timed in ``rounds`` alternating rounds of ``seconds / rounds`` each after one
    warm-up batch (worker start, pipeline build, loading into memory); each row's crops_per_s is the
    median round. Returns rows (name, crops_per_s), the training step last (name "training step").
    """
    from ..data import ensure_preprocessed

    torch_device = use_device(device)
    resolved = resolve_precision(precision, torch_device)
    crop = tuple(crop_size or get_config(model).crop_size)
    step, _ = training_step("pretrain", model, crop, batch_size, resolved, torch_device,
                            compile_model=resolve_compile(compile, torch_device))  # fmt: skip
    consumed = measure_step(step, 0, torch_device, seconds)["steps_per_s"] * batch_size
    del step
    grid = NNFormer(get_config(model)).encoder.unit_grid(crop)
    cache = ensure_preprocessed(data, progress=False)
    iterators = loader_iterators(cache, crop, batch_size, torch_device, (grid, MASK_RATIO), num_workers)
    rates: dict[str, list[float]] = {name: [] for name in iterators}
    for batches in iterators.values():
        next(batches)
    for _ in range(rounds):
        for name, batches in iterators.items():

            def cut(batches: Iterator[dict[str, Any]] = batches) -> float:
                next(batches)
                return 0.0

            rates[name].append(time_steps(cut, torch_device, seconds / rounds)["steps_per_s"] * batch_size)
    rows = [{"name": name, "crops_per_s": statistics.median(r)} for name, r in rates.items()]
    return [*rows, {"name": "training step", "crops_per_s": consumed}]


def limiting_verdict(rows: list[dict]) -> str:
    """Which side limits, from :func:`bench_loaders`' rows: every loader slower than the training
    step it feeds is named with its shortfall; else the step limits and the slowest loader's margin."""
    *loaders, step = rows
    short = [r for r in loaders if r["crops_per_s"] < step["crops_per_s"]]
    if short:
        return "; ".join(
            f"{r['name']} limits: {r['crops_per_s'] / step['crops_per_s']:.2f}x the crops/s the step consumes"
            for r in short
        )
    slowest = min(loaders, key=lambda r: r["crops_per_s"])
    margin = slowest["crops_per_s"] / step["crops_per_s"]
    return (
        f"the training step limits: the slowest loader ({slowest['name']}) supplies {margin:.1f}x the "
        "crops/s the step consumes"
    )
