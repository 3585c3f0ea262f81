"""Dense training steps with windows cut from the grid (roll + mask) vs grouped packed tokens.

The two window paths of ``models.blocks.TransformerBlock`` on the CPU, in one process, alternating
round by round, CPU time of this process (``time.process_time``: robust to other work on a shared
machine, exact for one thread): the dense MAE step and the fine-tuning step of the small config and
of the 3-stage small encoder the converged study uses (crop 32x48x32, batch 2, fp32). "grouped" is
the path every dense block took before (the plan sorts tokens by window, each block gathers them
into windows and back); it is selected here by switching the path's predicate, nothing else.

    OMP_NUM_THREADS=1 python benchmarks/dense_windows_cpu.py --rounds 5 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch

from maeformer_fast.models import blocks, plan
from maeformer_fast.train.bench import training_step
from maeformer_fast.train.study_protocol import encoder_overrides

CROP = (32, 48, 32)


@contextlib.contextmanager
def window_path(name: str) -> Iterator[None]:
    """``grid``: the library as it is; ``grouped``: dense blocks group packed tokens instead."""
    if name == "grid":
        yield
        return
    grouped = lambda dense, cyclic, backend, device: cyclic  # noqa: E731
    with (
        mock.patch.object(blocks, "windows_from_grid", grouped),
        mock.patch.object(plan, "windows_from_grid", grouped),
    ):
        yield


def cpu_ms_per_step(task: str, overrides: dict, path: str, steps: int) -> float:
    with window_path(path):
        step, _ = training_step(task, "small", CROP, 2, "fp32", torch.device("cpu"), "dense", overrides)
        step()  # warm-up: allocator, memoised grids and masks
        started = time.process_time()
        for _ in range(steps):
            step()
        return 1e3 * (time.process_time() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    cases = [
        (f"{model} {task}", task, overrides)
        for model, overrides in (("small", {}), ("small 3-stage", encoder_overrides("small", 3)))
        for task in ("pretrain", "finetune")
    ]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, task, overrides in cases:
            for path in ("grouped", "grid"):
                times.setdefault((name, path), []).append(cpu_ms_per_step(task, overrides, path, args.steps))
    print(f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps, CPU ms per step")
    print(f"{'case':<24} {'grouped':>9} {'grid':>9} {'grouped/grid':>13}")
    for name, _, _ in cases:
        grouped, grid = (statistics.median(times[(name, p)]) for p in ("grouped", "grid"))
        ratios = [g / r for g, r in zip(times[(name, "grouped")], times[(name, "grid")])]
        spread = f"({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"{name:<24} {grouped:9.1f} {grid:9.1f} {statistics.median(ratios):6.2f}x {spread}")


if __name__ == "__main__":
    main()
