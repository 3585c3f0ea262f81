"""Atomic, resumable checkpoints: safetensors weights + JSON metadata + a weights-only training state.

A checkpoint is a folder ``step-0000123`` written as ``.step-0000123.tmp``, fsynced and renamed, so a
run killed at any moment leaves either the old or the new checkpoint, never half of one. The pointer
file ``latest`` is replaced atomically after the rename. Nothing is ever unpickled: weights are
safetensors and the optimizer/RNG state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..weights import atomic_write_bytes, fsync_path, load_weights, save_weights

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class CheckpointManager:
    """Writes and finds the checkpoints of one run under ``root``; keeps the newest ``keep``."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        return folder if (folder / META).is_file() else None

    def save(self, step: int, model: nn.Module, training_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically and return its folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:07d}"
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_weights(tmp / WEIGHTS, unwrap(model).state_dict(), {"step": step})
        with open(tmp / STATE, "wb") as handle:
            torch.save(training_state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        atomic_write_bytes(tmp / META, json.dumps({**meta, "step": step}, indent=2).encode())
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(self.root)
        atomic_write_bytes(self.root / "latest", name.encode())
        self._prune(keep_name=name)
        return final

    def read_meta(self, folder: Path) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``folder`` (step, settings, run-specific state)."""
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{folder / META}: not a readable checkpoint record ({error})") from error
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError(f"{folder / META}: not a checkpoint record (no step)")
        return meta

    def load(self, folder: Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load weights into ``model`` (strict) and return (training_state, meta).

        Raises ValueError naming the file for a checkpoint that is damaged or belongs to another model.
        """
        meta = self.read_meta(folder)
        tensors, _ = load_weights(folder / WEIGHTS)
        try:
            unwrap(model).load_state_dict(tensors, strict=True)
        except RuntimeError as error:  # missing, unexpected or differently shaped weights
            raise ValueError(f"{folder / WEIGHTS}: weights of another model ({str(error)[:300]})") from error
        try:
            state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated, garbage, or a pickle that needs more than tensors
            raise ValueError(f"{folder / STATE}: not a readable training state ({error})") from error
        if not isinstance(state, dict) or not {"optimizer", "scheduler", "scaler"} <= set(state):
            raise ValueError(f"{folder / STATE}: not a training state of this library")
        return state, meta

    def _prune(self, keep_name: str) -> None:
        folders = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in folders[: max(len(folders) - self.keep, 0)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
