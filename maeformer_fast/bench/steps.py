"""Training-step throughput on this machine (``maeformer bench``): sparse vs dense MAE pretraining and
fine-tuning, each the project's own training step on random inputs made on the device, eager, compiled
and captured (compiled and replayed as CUDA graphs), with launches per step and model FLOP utilisation
(``step_metrics``); the table is ``bench_table``'s, the loader comparison ``bench_loaders``'.

A step is ``Optimisation.accumulate`` + ``step`` as in the training loops: autocast, loss, backward,
gradient clipping, the optimizer and LR schedule, and the one host read of the loss per step.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.io import atomic_write_text
from ..device import resolve_compile, resolve_precision, use_device
from ..models.config import get_config
from ..models.nnformer import NNFormer
from ..ops.masking import random_unit_mask
from ..train.distributed import DistInfo
from ..train.loop import prepare_model
from ..types import Triple
from .flops import step_flops
from .metrics import count_launches, matmul_dtype, peak_tflops, synchronize, utilisation

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
    from ..train import finetune as ft
    from ..train import pretrain as pt

    overrides = model_overrides or {}
    torch.manual_seed(0)
    with device:  # weights made on the device directly: the synapse model has 150 M parameters
        images = torch.randn(batch_size, 1, *crop)
        if task == "pretrain":
            config = pt.PretrainConfig(data="", out="", model=model_name, encoder=mode, steps=1000,
                                       model_overrides=overrides, compile=compile_model)  # fmt: skip
            model = pt.build_mae(config)
            optimisation = pt.build_optimisation(config, model, precision, device)
        elif task == "finetune":
            config = ft.FinetuneConfig(data="", out="", model=model_name, model_overrides=overrides,
                                       steps=1000, compile=compile_model)  # fmt: skip
            model = NNFormer(get_config(model_name, **overrides))
            optimisation = ft.build_optimisation(config, model, precision, device)
            labels = torch.randint(0, model.config.num_classes, (batch_size, *crop))
        else:
            raise ValueError(f"task must be 'pretrain' or 'finetune', got {task!r}")
    train_model = prepare_model(model, DistInfo(), device, compile_model, activation_checkpointing,
                                compile_backend, compile_mode, optimisation)  # fmt: skip
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


def sparse_dense_speedup(
    model_name: str,
    crop: Triple,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    model_overrides: dict[str, Any] | None = None,
    rounds: int = 3,
    seconds: float = 2.0,
) -> dict[str, float]:
    """How much faster the visible-only (sparse) MAE step is than the dense one for one model, crop and
    batch, eager: the two are timed in alternation, ``rounds`` times about ``seconds`` each after a
    warm-up step, so that a machine's drift hits both; the median of each. Returns sparse_ms, dense_ms
    and speedup (dense ms / sparse ms)."""
    steps = {mode: training_step("pretrain", model_name, crop, batch_size, precision, device, mode,
                                 model_overrides)[0] for mode in ("sparse", "dense")}  # fmt: skip
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(rounds):
        for mode, step in steps.items():
            times[mode].append(time_steps(step, device, seconds, min_steps=2)["ms_per_step"])
    sparse_ms, dense_ms = (statistics.median(times[mode]) for mode in ("sparse", "dense"))
    return {"sparse_ms": sparse_ms, "dense_ms": dense_ms, "speedup": dense_ms / sparse_ms}


# The step each case times: task and encoder of training_step.
CASES = {"sparse": ("pretrain", "sparse"), "dense": ("pretrain", "dense"), "finetune": ("finetune", "dense")}
# How each mode runs the model: (compile it, torch.compile mode). "captured" replays the compiled
# forward and backward (and optimizer step) as CUDA graphs. Compiled modes warm up for 5 steps:
# compilation, CUDA-graph recording and the first replay, one step later for the optimizer step (its
# first step, which creates its state, is eager), all fall in the first four.
MODES = {"eager": (False, None), "compiled": (True, None), "captured": (True, "reduce-overhead")}
WARMUP_STEPS = {"eager": 1, "compiled": 5, "captured": 5}


def case_flops(case: str, model: str, crop: Triple, batch_size: int, overrides: dict[str, Any]) -> int:
    """Counted FLOPs of one step of ``case`` (forward + backward; matmuls, convolutions, attention:
    :func:`~maeformer_fast.study.protocol.step_flops`): one sample counted on the CPU, times
    ``batch_size``. Samples cost alike (exact for dense steps; a sparse step's attention groups vary
    with the mask, ~0.2% on the small config), and counting a Synapse batch of 8 on a CPU would take
    minutes."""
    config = get_config(model, **overrides)
    task, encoder = CASES[case]
    ratio = MASK_RATIO if task == "pretrain" else None
    one = step_flops(model, overrides, crop, 1, config.in_channels, config.num_classes, ratio, encoder)
    return batch_size * one


def cached_case_flops(
    cache: Path | None, case: str, model: str, crop: Triple, batch_size: int, overrides: dict[str, Any]
) -> int:
    """:func:`case_flops`, read from (or added to) the JSON file ``cache`` where one is given: keyed by
    case, model, crop and overrides, per sample (times ``batch_size`` here, as the count is)."""
    if cache is None:
        return case_flops(case, model, crop, batch_size, overrides)
    key = json.dumps([case, model, list(crop), overrides], sort_keys=True)
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in saved:
        saved[key] = case_flops(case, model, crop, 1, overrides)
        atomic_write_text(cache, json.dumps(saved, indent=2))
    return batch_size * saved[key]


def default_modes(device: torch.device, compile_model: bool | None) -> list[str]:
    """Eager, plus the form the device compiles in when it compiles (``compile_model``, else the device's
    default): captured on CUDA (``prepare_model``'s "auto" mode on one GPU), compiled elsewhere."""
    if not resolve_compile(compile_model, device):
        return ["eager"]
    return ["eager", "captured" if device.type == "cuda" else "compiled"]


def release(device: torch.device) -> None:
    """Free what a case left behind (compiled graphs, CUDA-graph pools, cached blocks), so the next case
    is timed, and its peak memory measured, from its own baseline."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_case(
    case: str,
    mode: str,
    model: str,
    crop: Triple,
    batch_size: int,
    precision: str,
    device: torch.device,
    seconds: float,
    overrides: dict[str, Any],
) -> dict:
    """Time one (case, mode) as :func:`measure_step` does, then count its launches; ``fell_back`` holds
    the compiler's messages where a compiled mode ran (partly) eagerly. A captured mode off CUDA gives
    ``skipped``, a failure (a compiler error, out of memory) ``error``: one case must not hide the
    others."""
    if mode == "captured" and device.type != "cuda":
        return {"skipped": "n/a: CUDA graphs need a CUDA device"}
    task, encoder = CASES[case]
    compile_model, compile_mode = MODES[mode]
    try:
        step, voxels = training_step(task, model, crop, batch_size, precision, device, encoder, overrides,
                                     compile_model, compile_mode=compile_mode)  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row = measure_step(step, voxels, device, seconds, WARMUP_STEPS[mode])
        for w in caught:  # passed on, under the caller's filters
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        fallbacks = [str(w.message)[:300] for w in caught if "continuing eagerly" in str(w.message)]
        if fallbacks:
            row["fell_back"] = "; ".join(fallbacks)
        return {**row, **count_launches(step, device)}
    except Exception as error:  # compilers and allocators raise many types; the traceback goes to stderr
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    finally:
        step = None  # the last reference to the case's model and optimizer, before release
        release(device)


def bench(
    model: str = "small",
    crop_size: Sequence[int] | None = None,
    batch_size: int = 2,
    device: str = "auto",
    precision: str = "auto",
    seconds: float = 5.0,
    compile: bool | None = None,
    model_overrides: dict[str, Any] | None = None,
    modes: Sequence[str] | None = None,
    cases: Sequence[str] = tuple(CASES),
    peak: float | None = None,
    on_row: Callable[[dict], None] | None = None,
    flops_cache: Path | None = None,
    count_flops: bool = True,
) -> list[dict]:
    """Time the training steps of ``cases`` (sparse / dense MAE pretraining, fine-tuning) of ``model`` in
    each of ``modes`` (eager, compiled, captured; default :func:`default_modes`), one after another in
    this process, modes outermost (sparse and dense of one mode side by side).

    Returns one row per (case, mode), each also passed to ``on_row`` when measured: the setting (model,
    crop, batch, case, mode, precision, device, peak_tflops: ``peak`` or the device's datasheet peak for
    the matmul dtype, None if unknown), :func:`measure_step`'s figures (ms_per_step, steps_per_s,
    voxels_per_s, warmup_s; peak_mib on CUDA), :func:`launches_in`'s launches and kernels per step,
    flops (counted per step, :func:`case_flops`), tflops and mfu (a fraction, None without a peak) --
    or ``skipped`` / ``error`` instead of the figures.

    ``count_flops`` off (a warm-up that only fills the compile caches) leaves out the FLOPs and MFU.
    ``flops_cache``, a JSON file, keeps each count for later processes (counting one Synapse sample
    takes a while on the CPU; the GPU scripts run several benches of the same cases).
    """
    torch_device = use_device(device)
    resolved = resolve_precision(precision, torch_device)
    overrides = model_overrides or {}
    crop = tuple(crop_size or get_config(model, **overrides).crop_size)
    name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    setting = {"model": model, "crop": list(crop), "batch": batch_size, "precision": resolved, "device": name,
               "device_type": torch_device.type, "threads": torch.get_num_threads(),
               "peak_tflops": peak_tflops(name, matmul_dtype(resolved, torch_device), peak)}  # fmt: skip
    flops: dict[str, int] = {}  # per case: the count is the same in every mode
    rows = []
    release(torch_device)
    for mode in modes or default_modes(torch_device, compile):
        for case in cases:
            row = {**setting, "case": case, "mode": mode,
                   **measure_case(case, mode, model, crop, batch_size, resolved, torch_device, seconds,
                                  overrides)}  # fmt: skip
            if "ms_per_step" in row and count_flops:
                if case not in flops:
                    flops[case] = cached_case_flops(flops_cache, case, model, crop, batch_size, overrides)
                row["flops"] = flops[case]
                row.update(utilisation(flops[case], row["ms_per_step"], setting["peak_tflops"]))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
