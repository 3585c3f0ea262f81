"""Run-time plumbing shared by the training commands: device, precision, seeds, logs, failures."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from pathlib import Path

import torch


class NonFiniteLossError(RuntimeError):
    """Raised when a loss is NaN or Inf, naming the step and the cases of the batch."""


def check_finite(
    loss: float,
    step: int,
    case_ids: list[str],
    rank: int | None = None,
    local_loss: torch.Tensor | None = None,
) -> None:
    """Raise NonFiniteLossError when ``loss`` is NaN or Inf.

    Distributed runs pass the mean over all ranks (NaN anywhere makes it NaN everywhere), so every rank
    raises together instead of leaving the others waiting in a collective; ``rank`` and this rank's
    ``local_loss`` then tell where it came from. ``case_ids``: the cases of this rank's batches.
    """
    if math.isfinite(loss):
        return
    where = "" if rank is None or local_loss is None else f" (rank {rank}: loss {local_loss.item()})"
    raise NonFiniteLossError(
        f"loss is {loss} at step {step}{where}, batch cases: {', '.join(case_ids) or 'unknown'}; "
        "lower the learning rate, use fp32/bf16 instead of fp16, or check these cases for bad voxels"
    )


class PendingLosses:
    """Step losses left on the device and read on the host together.

    Reading each step's loss makes the host wait for the device every step (and rules out replaying
    steps as CUDA graphs back to back); the loops read them every ``--log-every`` steps and before
    every checkpoint instead, one device read per :meth:`read`. Every step's loss is still checked: a
    NaN/Inf is reported with its own step and batch, at most ``log_every - 1`` steps later, and always
    before a checkpoint could save the weights it broke.
    """

    def __init__(self, rank: int | None = None) -> None:
        self.rank = rank
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, list[str]]] = []

    def add(self, step: int, loss: torch.Tensor, local_loss: torch.Tensor, case_ids: list[str]) -> None:
        """Keep ``step``'s loss (scalar, the mean over ranks), this rank's ``local_loss`` and its cases."""
        self._pending.append((step, loss.detach(), local_loss.detach(), list(case_ids)))

    def read(self) -> list[float]:
        """The kept losses in step order (then forgotten); raises NonFiniteLossError at the first bad one."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        values = read_on_host(torch.stack([loss.float() for _, loss, _, _ in pending]))
        for (step, _, local_loss, case_ids), value in zip(pending, values):
            check_finite(value, step, case_ids, self.rank, local_loss)
        return values


def read_on_host(values: torch.Tensor) -> list[float]:
    """The training loops' one device-to-host read of their losses."""
    return values.tolist()


def complete_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV log that a run may be writing (or was killed writing), without a last line
    that has no newline yet: a half-written row."""
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return list(csv.DictReader(lines))


class CsvLog:
    """Appends rows to a CSV file, writing the header once; survives resumed runs (keeps the complete
    rows up to ``resume_step``, rewritten atomically, so a resumed run does not duplicate the steps it
    repeats and a kill during the rewrite loses nothing)."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None = None) -> None:
        from ..data.io import atomic_write_text  # here: the data package imports this module

        self.path = path
        self.fields = fields
        rows = []
        if resume_step is not None and path.exists():
            rows = [r for r in complete_rows(path) if int(r["step"]) <= resume_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())

    def write(self, **row: object) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.fields).writerow(row)

    def rows(self) -> Iterator[dict[str, str]]:
        with open(self.path, newline="") as handle:
            yield from csv.DictReader(handle)
