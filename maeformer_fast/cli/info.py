"""Environment report for ``maeformer info``: versions, devices and usable optional backends."""

from __future__ import annotations

import importlib
import os
import platform

import torch

from .. import __version__


def module_version(name: str) -> str | None:
    """Version string of an importable module, or None when it is not installed or fails to import."""
    try:
        module = importlib.import_module(name)
    except Exception:  # a broken optional install must not break the report
        return None
    return getattr(module, "__version__", "unknown")


def environment_report() -> dict[str, str]:
    """What is installed and what would run, as display strings."""
    from ..ops.backend import triton_available

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    triton = module_version("triton")
    dali = module_version("nvidia.dali")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return {
        "maeformer_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda devices": ", ".join(devices) if devices else "none (CPU only)",
        "cpu threads": str(torch.get_num_threads()),
        "triton": triton or "not installed",
        "triton window attention": "usable" + (" (interpreter)" if interpret and not cuda else "")
        if triton_available()
        else "not usable here (needs CUDA or TRITON_INTERPRET=1); the PyTorch path is used",
        "nvidia dali": (dali + (" (GPU)" if cuda else " (CPU pipelines)")) if dali else "not installed",
        "nibabel": module_version("nibabel") or "not installed",
    }
