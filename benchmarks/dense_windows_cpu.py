"""Dense training steps with windows cut from the grid (roll + mask) vs other window paths.

Window paths of ``models.blocks.TransformerBlock`` on the CPU, in one process, alternating round by
round, CPU time of this process (``time.process_time``: robust to other work on a shared machine,
exact for one thread): the dense MAE step and the fine-tuning step of the small config and of the
3-stage small encoder the converged study uses (crop 32x48x32, batch 2, fp32). "grid" is the library
as it is. "grouped" is the path every dense block took before (the plan sorts tokens by window, each
block gathers them into windows and back), selected by switching the path's predicate, nothing else.
"grid-sdpa" is the grid path with its training attention through SDPA, as before the explicit form
(``ops.window_attention.attend_with_bias``).

    OMP_NUM_THREADS=1 python benchmarks/dense_windows_cpu.py --rounds 5 --steps 4 --paths grouped,grid
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from maeformer_fast.bench.steps import training_step
from maeformer_fast.models import blocks, plan
from maeformer_fast.study.protocol import encoder_overrides

CROP = (32, 48, 32)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[0], -1, -1, -1), scale=scale)


@contextlib.contextmanager
def window_path(name: str) -> Iterator[None]:
    """``grid``: the library as it is; ``grouped``: dense blocks group packed tokens instead;
    ``grid-sdpa``: the grid path with SDPA for the attention it trains through."""
    if name == "grid":
        yield
    elif name == "grid-sdpa":
        with mock.patch.object(blocks, "attend_with_bias", sdpa_attention):
            yield
    elif name == "grouped":
        grouped = lambda dense, cyclic, backend, device: cyclic  # noqa: E731
        with (
            mock.patch.object(blocks, "windows_from_grid", grouped),
            mock.patch.object(plan, "windows_from_grid", grouped),
        ):
            yield
    else:
        raise ValueError(f"unknown window path {name!r}: grid, grouped or grid-sdpa")


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
    parser.add_argument("--paths", default="grouped,grid", help="two of grid, grouped, grid-sdpa")
    args = parser.parse_args()
    baseline, path = args.paths.split(",")
    cases = [
        (f"{model} {task}", task, overrides)
        for model, overrides in (("small", {}), ("small 3-stage", encoder_overrides("small", 3)))
        for task in ("pretrain", "finetune")
    ]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, task, overrides in cases:
            for p in (baseline, path):
                times.setdefault((name, p), []).append(cpu_ms_per_step(task, overrides, p, args.steps))
    print(f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps, CPU ms per step")
    print(f"{'case':<24} {baseline:>9} {path:>9} {baseline + '/' + path:>17}")
    for name, _, _ in cases:
        slow, fast = (statistics.median(times[(name, p)]) for p in (baseline, path))
        ratios = [b / r for b, r in zip(times[(name, baseline)], times[(name, path)])]
        spread = f"({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"{name:<24} {slow:9.1f} {fast:9.1f} {statistics.median(ratios):10.2f}x {spread}")


if __name__ == "__main__":
    main()
