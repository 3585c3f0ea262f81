"""Where and how a run computes, decided once: device, precision (autocast), torch.compile and its mode."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" -> CUDA when there is a GPU, else CPU; "cuda" without an index -> this process's GPU
    (torchrun's LOCAL_RANK). An explicit index is taken as given, except where torchrun started
    several processes on this machine: they would all share that one GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from error
    if device.type != "cuda":
        return device
    if device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"--device {name} would put every process of this machine on one GPU; under torchrun "
            "use --device cuda (or auto): each process takes the GPU of its LOCAL_RANK"
        )
    return device


def use_device(name: str = "auto") -> torch.device:
    """:func:`pick_device`, made the current CUDA device: Triton launches and default streams follow
    the current device, not the tensors' (``cuda:1`` in one process would launch on GPU 0)."""
    device = pick_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
        torch.cuda.set_device(device)
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 autocast by default on CUDA (fp16 on GPUs without native bf16), fp32 on CPU; fp16 only
    on CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        with torch.cuda.device(device):
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
    return precision


# torch.compile of the whole model when ``compile`` is left at None. Off until a GPU measurement
# (benchmarks/gpu_training.py, recorded in benchmarks/RESULTS.md) shows it faster on CUDA; on CPU it
# only costs compilation time.
COMPILE_BY_DEFAULT_ON_CUDA = False


def resolve_compile(compile_model: bool | None, device: torch.device) -> bool:
    """Whether to compile the model: as asked, else the measured default for the device."""
    if compile_model is not None:
        return compile_model
    return device.type == "cuda" and COMPILE_BY_DEFAULT_ON_CUDA


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_compile_mode(mode: str | None, device: torch.device, distributed: bool) -> str | None:
    """torch.compile's mode for ``mode``: "auto" is "reduce-overhead" (CUDA graphs) on a CUDA device in
    a single process, else the default mode (None); any other value is taken as it is."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" and not distributed else None


class CompiledModel(nn.Module):
    """``model`` compiled whole; a mode (training or eval) runs eagerly (with one warning) from its first
    compilation failure on: a missing compiler toolchain or an unsupported op must not stop a run, and
    a validation graph that fails to compile must not turn the training step eager too.

    One graph per input shape and train/eval mode (``dynamic=False``: a fixed batch, crop and mask ratio
    give fixed shapes); DDP, when used, wraps this module, so dynamo never sees its hooks.
    """

    static_shapes = True  # callers keep input shapes fixed (sliding-window inference fills up its last batch)

    def __init__(
        self, model: nn.Module, backend: str | Callable[..., Any] = "inductor", mode: str | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.eager_modes: set[bool] = set()  # values of ``training`` whose compilation failed

    @property
    def failed(self) -> bool:
        """Whether some mode fell back to eager."""
        return bool(self.eager_modes)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training not in self.eager_modes:
            try:
                with backward_compiled_with_forward():
                    return self.compiled(*args, **kwargs)
            except Exception as error:  # backends raise many types; the eager retry re-raises real bugs
                self.eager_modes.add(self.training)
                warn_eager_fallback("the model", error, "training" if self.training else "eval")
        return self.model(*args, **kwargs)


def warn_eager_fallback(what: str, error: Exception, mode: str | None = None) -> None:
    in_mode = f" in {mode} mode" if mode else ""
    warnings.warn(
        f"torch.compile of {what} failed ({type(error).__name__}: {str(error)[:500]}); continuing eagerly"
        f"{in_mode}",
        RuntimeWarning,
        stacklevel=3,
    )


def backward_compiled_with_forward() -> contextlib.AbstractContextManager:
    """AOTAutograd lowers a graph's backward at its first ``backward()`` unless told otherwise: then a
    backend that fails only on the backward would fail outside the fallback's reach. Lower it while
    the forward compiles (torch versions without the switch keep the lazy lowering)."""
    config = torch._functorch.config
    if not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)
