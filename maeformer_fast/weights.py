"""Durable file writes and safetensors weights with JSON metadata (never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_with(tmp: Path | str, path: Path | str) -> None:
    """Rename the finished temporary file ``tmp`` over ``path``, with the permissions a plain ``open``
    would give it (mkstemp and safetensors create owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Atomically write a safetensors file whose metadata holds ``metadata`` as JSON strings."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    fsync_path(tmp)
    replace_with(tmp, path)
    fsync_path(path.parent)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by :func:`save_weights`: (tensors, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        inside = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))) or "none"
        raise IsADirectoryError(f"{path}: a folder, not a weights file (.safetensors files in it: {inside})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own types for truncated/corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    return tensors, {k: json.loads(v) for k, v in raw.items()}
