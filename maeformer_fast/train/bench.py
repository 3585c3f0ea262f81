"""Training-step throughput on this machine (``maeformer bench``): sparse vs dense MAE pretraining and
fine-tuning, each the project's own training step on random inputs made on the device, eager, compiled
and captured (compiled and replayed as CUDA graphs), with launches per step and model FLOP utilisation.

A step is ``Optimisation.accumulate`` + ``step`` as in the training loops: autocast, loss, backward,
gradient clipping, the optimizer and LR schedule, and the one host read of the loss per step.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import re
import statistics
import time
import traceback
import warnings
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
from .study_protocol import step_flops

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


# The step each case times: task and encoder of training_step.
CASES = {"sparse": ("pretrain", "sparse"), "dense": ("pretrain", "dense"), "finetune": ("finetune", "dense")}
CASE_LABELS = {"sparse": "pretrain sparse", "dense": "pretrain dense", "finetune": "finetune"}
# How each mode runs the model: (compile it, torch.compile mode). "captured" replays the compiled
# forward and backward (and optimizer step) as CUDA graphs. Compiled modes warm up for 5 steps:
# compilation, CUDA-graph recording and the first replay, one step later for the optimizer step (its
# first step, which creates its state, is eager), all fall in the first four.
MODES = {"eager": (False, None), "compiled": (True, None), "captured": (True, "reduce-overhead")}
WARMUP_STEPS = {"eager": 1, "compiled": 5, "captured": 5}
PROFILED_STEPS = 3

# Dense (no 2:4 sparsity) peak TFLOPS per dtype, from NVIDIA's datasheets: H100 SXM5 (the H200 SXM has
# the same compute) and A100 (SXM4 and PCIe alike). Matched on torch.cuda.get_device_name(); the
# H100/H200 PCIe and NVL parts have lower peaks and are deliberately not matched.
PEAK_TFLOPS = (
    (
        re.compile(r"^NVIDIA H(100 80GB HBM3|200)$"),
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    ),
    (re.compile(r"^NVIDIA A100[- ]"), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
# Host-side calls that launch work on a CUDA device: kernels (runtime, and the driver calls Triton
# makes) and CUDA-graph replays.
LAUNCH_CALL = re.compile(r"^cu(da)?(LaunchKernel|LaunchCooperativeKernel|GraphLaunch)")


def matmul_dtype(precision: str, device: torch.device) -> str:
    """The dtype the step's matmuls run in, which picks the peak: autocast's bf16/fp16; fp32 runs as
    TF32 on CUDA where torch allows it (``torch.backends.cuda.matmul.allow_tf32`` or float32 matmul
    precision "high"/"medium"; off by default). cuDNN convolutions follow ``torch.backends.cudnn.
    allow_tf32`` (on by default), so an fp32 MFU may include some TF32-rate conv work."""
    if precision != "fp32":
        return precision
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def peak_tflops(device_name: str, dtype: str, override: float | None = None) -> float | None:
    """Dense peak TFLOPS of ``device_name`` for ``dtype``: ``override`` (``--peak-tflops``) when given,
    else :data:`PEAK_TFLOPS`' entry, else None (an unknown device, or the CPU)."""
    if override is not None:
        return override
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.search(device_name):
            return peaks[dtype]
    return None


def utilisation(flops: int, ms_per_step: float, peak: float | None) -> dict[str, float | None]:
    """Achieved TFLOPS (``flops`` per step / seconds per step / 1e12) and MFU (that / ``peak``
    TFLOPS, a fraction; None without a peak)."""
    tflops = flops / (ms_per_step / 1e3) / 1e12
    return {"tflops": tflops, "mfu": None if peak is None else tflops / peak}


def case_flops(case: str, model: str, crop: Triple, batch_size: int, overrides: dict[str, Any]) -> int:
    """Counted FLOPs of one step of ``case`` (forward + backward; matmuls, convolutions, attention:
    :func:`~maeformer_fast.train.study_protocol.step_flops`): one sample counted on the CPU, times
    ``batch_size``. Samples cost alike (exact for dense steps; a sparse step's attention groups vary
    with the mask, ~0.2% on the small config), and counting a Synapse batch of 8 on a CPU would take
    minutes."""
    config = get_config(model, **overrides)
    task, encoder = CASES[case]
    ratio = MASK_RATIO if task == "pretrain" else None
    one = step_flops(model, overrides, crop, 1, config.in_channels, config.num_classes, ratio, encoder)
    return batch_size * one


def _outermost_aten(event: Any) -> bool:
    """Whether a profiler event is an aten op with no aten op above it (called from Python or the
    autograd engine, not from inside another op)."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def launches_in(events: Sequence[Any], device_type: str, steps: int) -> dict[str, float | None]:
    """Launches per step in the profiler ``events`` of ``steps`` steps.

    CUDA: ``launches`` = host calls that launch device work (cudaLaunchKernel, the driver's
    cuLaunchKernel(Ex) that Triton uses; a CUDA-graph replay is one cudaGraphLaunch, whatever it holds),
    ``kernels`` = kernels the device ran (kernel events: each kernel of a replayed graph counts;
    memcpy and memset not). CPU: ``launches`` = aten ops called from Python or the autograd engine
    (an op's own internal calls are part of it) -- the per-op host cost that kernel launches are on
    CUDA; ``kernels`` None.
    """
    if device_type == "cuda":
        launches = sum(1 for e in events if LAUNCH_CALL.match(e.name))
        kernels = sum(
            1
            for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
        )
        return {"launches": launches / steps, "kernels": kernels / steps}
    return {"launches": sum(map(_outermost_aten, events)) / steps, "kernels": None}


def count_launches(step: Callable[[], float], device: torch.device, steps: int = PROFILED_STEPS) -> dict:
    """:func:`launches_in` of ``steps`` steps of ``step`` run under ``torch.profiler`` (after the
    caller's warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    return launches_in(prof.events(), device.type, steps)


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
            if "ms_per_step" in row:
                if case not in flops:
                    flops[case] = case_flops(case, model, crop, batch_size, overrides)
                row["flops"] = flops[case]
                row.update(utilisation(flops[case], row["ms_per_step"], setting["peak_tflops"]))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


# The table's figures: heading and width.
COLUMNS = (("ms/step", 9), ("steps/s", 9), ("Mvox/s", 8), ("launches", 10), ("kernels", 9), ("GFLOP", 9),
           ("TFLOPS", 9), ("MFU", 7), ("peak MiB", 10), ("warm-up s", 10))  # fmt: skip


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(step: str, mode: str, cells: Sequence[str]) -> str:
    return f"{step:<17}{mode:<10}" + "".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS))


def _setting(row: dict) -> tuple:
    return row["model"], tuple(row["crop"]), row["batch"], row["precision"], row["device"]


def legend(rows: list[dict]) -> list[str]:
    """What the table's launches and MFU columns mean for the device types and peaks of ``rows``."""
    lines = []
    if any(r["device_type"] == "cuda" for r in rows):
        lines.append("launches: host calls launching device work per step (a CUDA-graph replay is one); "
                     "kernels: kernels the GPU ran per step")  # fmt: skip
    if any(r["device_type"] != "cuda" for r in rows):
        lines.append("launches (CPU): aten ops called from Python or autograd per step, the CPU's analogue "
                     "of kernel launches")  # fmt: skip
    lines.append("GFLOP: counted per step (matmul, conv, attention; forward + backward); MFU = GFLOP / time "
                 "/ the device's dense peak for the matmul dtype")  # fmt: skip
    for device, peak in dict.fromkeys((r["device"], r["peak_tflops"]) for r in rows):
        lines.append(
            f"peak of {device}: " + ("unknown, MFU n/a (--peak-tflops)" if peak is None else f"{peak} TFLOPS")
        )
    return lines


def format_row(row: dict) -> str:
    """One table line of a :func:`bench` row."""
    if "ms_per_step" not in row:
        return f"{CASE_LABELS[row['case']]:<17}{row['mode']:<10}" + (
            row.get("skipped") or f"error: {row['error']}"
        )
    cells = [f"{row['ms_per_step']:.1f}", f"{row['steps_per_s']:.2f}", f"{row['voxels_per_s'] / 1e6:.2f}",
             f"{row['launches']:.0f}", _number(row["kernels"], ".0f"), f"{row['flops'] / 1e9:.1f}",
             f"{row['tflops']:.3g}", "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
             _number(row.get("peak_mib"), ".0f"), f"{row['warmup_s']:.1f}"]  # fmt: skip
    note = "  fell back to eager (fell_back in --json)" if "fell_back" in row else ""
    return _line(CASE_LABELS[row["case"]], row["mode"], cells) + note


def speed_ratios(rows: list[dict]) -> str | None:
    """The sparse / dense pretraining speed ratio of each mode with both steps timed, as a line."""
    ms = {(r["case"], r["mode"]): r["ms_per_step"] for r in rows if "ms_per_step" in r}
    timed = [m for m in dict.fromkeys(r["mode"] for r in rows) if {("sparse", m), ("dense", m)} <= ms.keys()]
    ratios = ", ".join(f"{m} {ms['dense', m] / ms['sparse', m]:.2f}x" for m in timed)
    return f"sparse / dense pretraining speed: {ratios}" if timed else None


def format_table(rows: list[dict]) -> list[str]:
    """The table of :func:`bench` rows (of one or several settings): the legend, then per setting a
    heading, one line per (case, mode) and the sparse/dense speed ratios."""
    lines = legend(rows)
    for setting in dict.fromkeys(map(_setting, rows)):
        group = [r for r in rows if _setting(r) == setting]
        model, crop, batch, precision, device = setting
        threads = "" if group[0]["device_type"] == "cuda" else f", torch threads: {group[0]['threads']}"
        lines += [
            "",
            f"{model}, crop {'x'.join(map(str, crop))}, batch {batch}, {precision} on {device}{threads}",
        ]
        lines += [_line("step", "mode", [name for name, _ in COLUMNS]), *map(format_row, group)]
        lines += [line for line in [speed_ratios(group)] if line]
    return lines


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
