"""Atomic, verified, resumable checkpoints: safetensors weights + a weights-only training state + a
JSON record that is also the manifest (size and sha256 of each file).

A checkpoint is a folder ``step-0000123`` written as ``.step-0000123.tmp``, fsynced and renamed, so a
run killed at any moment leaves either the old or the new checkpoint, never half of one; a failed
write (a full disk) removes its temporary folder. The pointer file ``latest`` is replaced atomically
after the rename, for people and scripts: a resume takes the newest checkpoint whose files match its
manifest, and sets a damaged one aside (renamed, never deleted or overwritten) with a message naming
it. The newest ``keep`` (default 2) are kept, so a damaged newest one leaves the one before. Nothing is
ever unpickled: weights are safetensors and the optimizer/RNG state is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..weights import atomic_write_bytes, fsync_path, load_weights, save_weights
from .distributed import DistInfo, broadcast_from_main

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"
POINTER = "latest"
FILES = {WEIGHTS: "weights file", STATE: "training state"}  # the manifest's files, as messages name them
CHECKPOINT_NAME = re.compile(r"step-(\d{7,})")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of ``path``, as the manifest holds them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def os_error(error: BaseException) -> OSError | None:
    """The OS error behind a failed write, or None: ``error`` itself or one it was raised from or during
    (torch.save reports a full disk as its zip writer's RuntimeError, raised while handling the
    OSError), or the one safetensors' error text holds (its Rust I/O errors reach Python as text:
    "Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })")."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if type(error).__name__ == "SafetensorError" and (code := re.search(r"Os \{ code: (\d+)", str(error))):
        return OSError(int(code[1]), os.strerror(int(code[1])))
    return None


class CheckpointManager:
    """Writes and finds the checkpoints of one run under ``root``; keeps the newest ``keep``.

    ``dist``: the run's ranks. Rank 0 alone writes; on resume rank 0 verifies and chooses, and every
    rank loads its choice (so ranks never resume from different steps).
    """

    def __init__(self, root: str | Path, keep: int = 2, dist: DistInfo | None = None) -> None:
        self.root = Path(root)
        self.keep = keep
        self.dist = dist or DistInfo()

    def folder(self, step: int) -> Path:
        """Where checkpoint ``step`` is (or will be)."""
        return self.root / f"step-{step:07d}"

    def folders(self) -> list[Path]:
        """The finished checkpoint folders, newest first, intact or not (a ``.tmp`` folder is unfinished,
        a set-aside damaged one is renamed: neither counts)."""
        found = [p for p in self.root.glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)

    def save(self, step: int, model: nn.Module, training_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically and return its folder.

        Any failure removes the unfinished folder; an OS error (ENOSPC, a quota, an I/O error) is raised
        as an OSError naming the checkpoint folder and the newest checkpoint left intact.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.folder(step)
        tmp = self.root / f".{final.name}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing
            tmp.mkdir()
            save_weights(tmp / WEIGHTS, unwrap(model).state_dict(), {"step": step})
            with open(tmp / STATE, "wb") as handle:
                torch.save(training_state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            files = {name: file_record(tmp / name) for name in FILES}
            record = {**meta, "step": step, "files": files}
            atomic_write_bytes(tmp / META, json.dumps(record, indent=2).encode())
            if final.exists():  # only by another process writing into this run's folder: kept, not lost
                self._set_aside(final, "replaced")
            os.replace(tmp, final)
            fsync_path(self.root)
            atomic_write_bytes(self.root / POINTER, final.name.encode())
        except Exception as error:
            shutil.rmtree(tmp, ignore_errors=True)
            (self.root / f".{POINTER}.tmp").unlink(missing_ok=True)
            cause = os_error(error)
            if cause is None:
                raise
            newest = next(iter(self.folders()), None)
            left = f"the newest checkpoint there is {newest.name}" if newest else "there is no checkpoint yet"
            raise OSError(
                cause.errno,
                f"cannot write checkpoint {final.name} in {self.root} ({cause.strerror or cause}); no "
                f"partial file is left and {left}: free space there (or choose another --out) and resume",
            ) from error
        self._prune(keep=final)
        return final

    def read_meta(self, folder: Path) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``folder`` (step, settings, run-specific state, manifest)."""
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{folder / META}: not a readable checkpoint record ({error})") from error
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError(f"{folder / META}: not a checkpoint record (no step)")
        return meta

    def verify(self, folder: Path) -> dict[str, Any]:
        """The record of ``folder`` after checking each file's size and sha256 against it; raises
        ValueError naming the first damaged file. Checkpoints written before the manifest existed
        have only their record checked (their files are still read strictly by :meth:`load`)."""
        meta = self.read_meta(folder)
        for name, expected in meta.get("files", {}).items():
            path = folder / name
            try:
                found = file_record(path)
            except OSError as error:
                raise ValueError(f"{path}: not a readable {FILES.get(name, 'file')} ({error})") from error
            if found["bytes"] != expected["bytes"]:
                change = f"{found['bytes']} bytes where {META} says {expected['bytes']}: truncated or damaged"
            elif found["sha256"] != expected["sha256"]:
                change = f"its sha256 differs from the one in {META}: damaged"
            else:
                continue
            raise ValueError(f"{path}: not a readable {FILES.get(name, 'file')} ({change})")
        return meta

    def newest(self) -> Path | None:
        """The newest intact checkpoint, or None where there is none at all.

        Rank 0 verifies from the newest down and uses the first intact one; the damaged ones above it
        are named on stderr and set aside. Raises ValueError naming them when none is intact (nothing
        is set aside then, so a rerun says the same instead of silently starting over). Every rank
        gets rank 0's answer.
        """
        choice = self._newest_intact() if self.dist.is_main else None
        choice = broadcast_from_main(choice, self.dist)
        if isinstance(choice, Exception):
            raise choice
        return None if choice is None else self.root / choice

    def _newest_intact(self) -> str | ValueError | None:
        damaged: list[tuple[Path, ValueError]] = []
        for folder in self.folders():
            try:
                self.verify(folder)
            except ValueError as error:
                damaged.append((folder, error))
                continue
            for bad, error in damaged:
                aside = self._set_aside(bad, "damaged")
                message = f"maeformer: damaged checkpoint: {error}; set aside as {aside.name}"
                print(f"{message}; resuming from {folder.name}", file=sys.stderr, flush=True)
            if damaged:  # the pointer named a checkpoint that is now set aside
                atomic_write_bytes(self.root / POINTER, folder.name.encode())
            return folder.name
        if damaged:
            return ValueError(
                f"{self.root}: no intact checkpoint to resume from: {'; '.join(str(e) for _, e in damaged)}; "
                "delete them to start the run again there, or start it in another --out"
            )
        return None

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

    def _set_aside(self, folder: Path, why: str) -> Path:
        """Rename ``folder`` out of the checkpoints to ``<name>.<why>`` (kept for a look, never reused)."""
        aside, count = folder.with_name(f"{folder.name}.{why}"), 1
        while aside.exists():
            count += 1
            aside = folder.with_name(f"{folder.name}.{why}-{count}")
        os.replace(folder, aside)
        return aside

    def _prune(self, keep: Path) -> None:
        for old in self.folders()[self.keep :]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
