"""``maeformer bench --loader``: crops/s of each data loader next to what the training step consumes."""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_compile, resolve_precision, use_device
from ..models.config import get_config
from ..models.nnformer import NNFormer
from ..types import Triple
from .steps import MASK_RATIO, measure_step, time_steps, training_step


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
    median round. Returns rows (name, crops_per_s), the training step last (name "training step",
    ``compiled``: whether it ran compiled, on one GPU also captured as CUDA graphs).
    """
    from ..data import ensure_preprocessed

    torch_device = use_device(device)
    resolved = resolve_precision(precision, torch_device)
    crop = tuple(crop_size or get_config(model).crop_size)
    compiled = resolve_compile(compile, torch_device)
    step, _ = training_step("pretrain", model, crop, batch_size, resolved, torch_device,
                            compile_model=compiled)  # fmt: skip
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
    return [*rows, {"name": "training step", "crops_per_s": consumed, "compiled": compiled}]


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
