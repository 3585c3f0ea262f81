"""Stopping a training run cleanly on the signals clusters and people send.

SIGTERM (preemption, a job's end), SIGUSR1 (SLURM's ``--signal=USR1@120`` warning) and SIGINT
(Ctrl-C) do not interrupt a step: the handler only records the signal, and the training loop asks
:meth:`StopSignals.requested` after every optimizer step. Under torchrun that question is collective
(one all-reduce of a flag over a gloo group), so one rank's signal stops every rank after the same
step; rank 0 then writes a checkpoint and the run returns an :class:`Interruption`, which the CLI turns
into exit code 75 (EX_TEMPFAIL: requeue me) or 130 (Ctrl-C). A second signal meanwhile is recorded
like the first, so it cannot interrupt the checkpoint being written.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from .distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, DistInfo

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later", what a requeueing job script tests for
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C
DEFAULT_STOP_SIGNALS = "TERM,USR1"
NO_SIGNALS = ("", "none")


def parse_signals(names: str) -> tuple[signal.Signals, ...]:
    """The signals of ``names``: comma-separated, with or without ``SIG`` ("TERM,USR1", "SIGTERM");
    "none" or "" for none. Raises ValueError naming an unknown signal. SIGINT (Ctrl-C) is always
    handled and need not be listed; SIGKILL and SIGSTOP cannot be."""
    if names.strip().lower() in NO_SIGNALS:
        return ()
    found = []
    for name in (n.strip().upper() for n in names.split(",")):
        full = name if name.startswith("SIG") else f"SIG{name}"
        if full in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, full, None), signal.Signals):
            raise ValueError(
                f"stop_signals: {name!r} is not a signal a run can catch; give names such as TERM,USR1 "
                "(or none)"
            )
        found.append(signal.Signals[full])
    return tuple(found)


@dataclass(frozen=True)
class Interruption:
    """A run stopped by ``signal`` (its name, e.g. "SIGTERM") after ``step``, with ``checkpoint``
    written there: rerunning it with ``--resume`` continues as if it had not stopped."""

    signal: str
    step: int
    checkpoint: Path

    @property
    def exit_code(self) -> int:
        """130 for Ctrl-C, as a shell reports it; 75 (EX_TEMPFAIL) for a scheduler's signal."""
        return EXIT_INTERRUPTED if self.signal == "SIGINT" else EXIT_PREEMPTED

    def message(self, command: str, resumes: bool) -> str:
        """One line for the user: what stopped the run, where it stands, how to continue it
        (``resumes``: the command line already resumes, so it is rerun as it is)."""
        how = "rerun the same command" if resumes else "rerun the same command with --resume auto"
        return (
            f"maeformer {command}: stopped by {self.signal} after step {self.step} with checkpoint "
            f"{self.checkpoint}; {how} to continue"
        )


class StopSignals:
    """Within ``with``: catch SIGINT and ``names`` (:func:`parse_signals`); the previous handlers come
    back at exit. Handlers are installed only from the main thread (Python allows no other); a run in
    another thread keeps the process's handlers but still takes part in the collective question.

    The loop's :meth:`requested` after every step is free in one process and one all-reduce of one
    integer over a gloo group under torchrun: on the host, so a CUDA run does not wait for its device
    each step (the group is separate from NCCL's, with the same timeout: rank 0 may validate while the
    other ranks wait in it).
    """

    def __init__(self, names: str, dist_info: DistInfo) -> None:
        self.signals = tuple(dict.fromkeys((signal.SIGINT, *parse_signals(names))))  # each once
        self.dist_info = dist_info
        self.signal: signal.Signals | None = None  # the agreed signal, once :meth:`requested` said so
        self._received = 0  # the highest signal number received: TERM and USR1 outrank a Ctrl-C
        self._pid = os.getpid()
        self._previous: dict[signal.Signals, Any] = {}
        self._group: Any = None

    def __enter__(self) -> StopSignals:
        if self.dist_info.enabled:
            timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
            self._group = dist.new_group(backend="gloo", timeout=timeout)
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Forked loader workers inherit this handler: their signal is the training process's to act on.
        if os.getpid() != self._pid:
            return
        first = not self._received
        self._received = max(self._received, signum)
        if first:  # os.write: print() could re-enter a write to stderr that the signal interrupted
            rank = f" (rank {self.dist_info.rank})" if self.dist_info.enabled else ""
            name = signal.Signals(signum).name
            os.write(2, f"maeformer: {name}{rank}: stopping after this step with a checkpoint\n".encode())

    def requested(self) -> bool:
        """Whether the run stops after the step it just took: a signal reached this process or, under
        torchrun, any rank (every rank must call this after every step; all get the same answer)."""
        received = self._received
        if self._group is not None:
            flag = torch.tensor([received], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag.item())
        if received:
            self.signal = signal.Signals(received)
        return bool(received)

    def interruption(self, step: int, checkpoint: Path) -> Interruption | None:
        """The run's :class:`Interruption` after :meth:`requested` said stop at ``step``; else None."""
        return None if self.signal is None else Interruption(self.signal.name, step, checkpoint)
