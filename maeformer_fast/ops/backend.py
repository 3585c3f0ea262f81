"""One place that decides which backend runs an op (Triton kernels or pure PyTorch), and why."""

from __future__ import annotations

import os

import torch

ATTENTION_BACKENDS = ("auto", "torch", "reference", "triton")


@torch.compiler.assume_constant_result
def _triton_importable() -> bool:
    # Constant for the process; the decorator lets torch.compile fold it instead of tracing an import.
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available() -> bool:
    """Whether the Triton backend can run here: triton imports, and CUDA is present or the
    interpreter is on (``TRITON_INTERPRET=1``, CPU tensors, fp32 only, slow)."""
    return _triton_importable() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for ``backend`` on ``device``: "auto" is triton on CUDA (where triton
    imports), torch elsewhere."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


CONV_BACKENDS = ("auto", "torch", "triton")


def resolve_conv_backend(backend: str, device: torch.device) -> str:
    """ "triton" or "torch" for a sparse conv on ``device``; "auto" is Triton on CUDA, torch elsewhere."""
    if backend not in CONV_BACKENDS:
        raise ValueError(f"conv backend must be one of {CONV_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and triton_available() else "torch"
