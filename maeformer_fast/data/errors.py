"""Errors raised for bad input data: every problem names the file and what is wrong with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One bad file (or case) found while reading a dataset."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DatasetError(ValueError):
    """A dataset (or a single volume) failed validation.

    ``problems`` lists every bad file found, so one scan reports all of them at once instead of dying on
    the first. ``str(err)`` shows them all, one per line.
    """

    def __init__(self, problems: list[Problem], root: str | Path | None = None) -> None:
        self.problems = list(problems)
        self.root = str(root) if root is not None else None
        head = f"{len(self.problems)} problem(s)" + (f" in dataset {self.root}" if self.root else "")
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}:\n{lines}")


def problem(path: str | Path, message: str) -> DatasetError:
    """A DatasetError holding a single problem (for single-file reads)."""
    return DatasetError([Problem(str(path), message)])
