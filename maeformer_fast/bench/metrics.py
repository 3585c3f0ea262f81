"""What ``maeformer bench`` reports besides time: launches per step (``torch.profiler``) and model FLOP
utilisation against a device's datasheet peak."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

PROFILED_STEPS = 3  # steps under the profiler after the caller's warm-up

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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
