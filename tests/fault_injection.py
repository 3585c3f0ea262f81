"""Faults injected into real training runs (tests/train/test_faults.py).

:func:`inject` patches the training code of this process with a dict of faults:

- ``"after_step": k, "signal": "SIGTERM"``: the process sends itself that signal (SIGKILL included)
  right after its k-th optimizer step (step k of the run when it starts at 0);
- ``"rank": r``: only rank r does (default: every rank);
- ``"during_save": ["SIGTERM", "SIGINT"]``: the checkpoint a stop request makes the run write gets
  these signals while it is written (between the weights and the training state);
- ``"log": path``: every run appends a JSON line ``{"attempt", "rank", "start"}`` to ``path`` once it
  has resumed (``start``: the step it continues from, 0 for a fresh start).

Step and save faults act only on torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0, or a
single process): a restarted group runs clean. Run as a script (also under torchrun), it runs the
``maeformer`` command line of its arguments with the faults of the environment variable
``MAEFORMER_FAULTS`` (JSON) and exits with the command's exit code.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import maeformer_fast.train.checkpoint as checkpoint
from maeformer_fast.train.loop import Optimisation
from maeformer_fast.train.preemption import StopSignals

FAULTS_ENV = "MAEFORMER_FAULTS"


def inject(faults: dict[str, Any], patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Patch this process's training code with ``faults`` (module docstring) through ``patch``
    (``setattr``; a test passes ``monkeypatch.setattr``, which undoes it)."""
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if "log" in faults:
        resume = Optimisation.resume

        @functools.wraps(resume)
        def logged_resume(self: Optimisation, *args: Any, **kwargs: Any) -> tuple[int, dict]:
            step, meta = resume(self, *args, **kwargs)
            with open(faults["log"], "a") as handle:
                handle.write(json.dumps({"attempt": attempt, "rank": rank, "start": step}) + "\n")
            return step, meta

        patch(Optimisation, "resume", logged_resume)
    if attempt != 0 or faults.get("rank", rank) != rank:
        return
    if "after_step" in faults:
        optimizer_step, taken = Optimisation.step, [0]

        @functools.wraps(optimizer_step)
        def faulty_step(self: Optimisation) -> None:
            optimizer_step(self)
            taken[0] += 1
            if taken[0] == faults["after_step"]:
                os.kill(os.getpid(), signal.Signals[faults["signal"]])

        patch(Optimisation, "step", faulty_step)
    if "during_save" in faults:
        requested, save_weights, stopping = StopSignals.requested, checkpoint.save_weights, [False]

        @functools.wraps(requested)
        def noted_request(self: StopSignals) -> bool:
            stopping[0] = requested(self)
            return stopping[0]

        @functools.wraps(save_weights)
        def signalled_save(*args: Any, **kwargs: Any) -> None:
            save_weights(*args, **kwargs)
            for name in faults["during_save"] if stopping[0] else []:
                os.kill(os.getpid(), signal.Signals[name])

        patch(StopSignals, "requested", noted_request)
        patch(checkpoint, "save_weights", signalled_save)


if __name__ == "__main__":
    from maeformer_fast.cli.main import main

    inject(json.loads(os.environ.get(FAULTS_ENV, "{}")))
    sys.exit(main(sys.argv[1:]))
