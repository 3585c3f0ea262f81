"""The table of ``gpu_feed_check.sh``: the steps on random tensors, a real run against them, and the
loaders against the step they feed.

    python benchmarks/feed_table.py ROWS.jsonl LOADERS.jsonl PRETRAIN_LOG.csv

ROWS: ``maeformer bench --json`` rows (sparse and dense MAE steps on random tensors); LOADERS:
``maeformer bench --loader --json`` rows; PRETRAIN_LOG: a ``maeformer pretrain`` run's log. A missing or
empty file gives a line saying so, not an error: the device call prints what it measured.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

RESIDENT_TARGET = 3.0  # resident crops/s over the captured step's
REAL_DATA_TARGET = 1.10  # real-data ms/step over the random-tensor step's


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_ms_per_step(log: Path, skip: float = 0.5) -> tuple[float, int] | None:
    """Median ms/step over the logged intervals after the first ``skip`` share of the run (compilation,
    CUDA-graph recording and the first loads fall before it) and the number of intervals used; None
    without two logged rows."""
    if not log.is_file():
        return None
    with log.open() as handle:
        points = [(int(row["step"]), float(row["elapsed_s"])) for row in csv.DictReader(handle)]
    kept = [p for p in points if p[0] > skip * points[-1][0]] if points else []
    intervals = [1e3 * (t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(kept, kept[1:])]
    return (statistics.median(intervals), len(intervals)) if intervals else None


def feed_lines(rows: list[dict], loaders: list[dict], real: tuple[float, int] | None) -> list[str]:
    """The table's lines: each loader's crops/s and its ratio to the step it feeds, then the real run
    against the fastest random-tensor sparse step (the captured one where it ran), each with its
    target."""
    lines = []
    if loaders:
        *sources, step = loaders
        compiled = "compiled" if step.get("compiled") else "eager"
        lines.append(
            f"loaders (model {step['model']}, batch {step['batch_size']}, {step['num_workers']} workers):"
        )
        for row in sources:
            ratio = row["crops_per_s"] / step["crops_per_s"]
            lines.append(f"  {row['name']:<14}{row['crops_per_s']:>10.0f} crops/s  {ratio:6.2f}x the step")
        lines.append(f"  {'step (' + compiled + ')':<14}{step['crops_per_s']:>10.0f} crops/s")
        resident = next((r for r in sources if r["name"] == "resident"), None)
        if resident:
            ratio = resident["crops_per_s"] / step["crops_per_s"]
            met = "met" if ratio >= RESIDENT_TARGET else "missed"
            lines.append(f"  resident / step {ratio:.2f}x (target >= {RESIDENT_TARGET:.0f}x: {met})")
        lines.append(f"  {step['verdict']}")
    else:
        lines.append("loaders: not measured")
    timed = [r for r in rows if "ms_per_step" in r and r.get("case") == "sparse"]
    if not timed or real is None:
        missing = "random-tensor sparse step" if not timed else "real pretraining run"
        return [*lines, f"real data vs random tensors: {missing} not measured"]
    fastest = min(timed, key=lambda r: r["ms_per_step"])
    ratio = real[0] / fastest["ms_per_step"]
    met = "met" if ratio <= REAL_DATA_TARGET else "missed"
    lines.append(
        f"real pretraining run {real[0]:.2f} ms/step (median of {real[1]} logged intervals, second half) vs "
        f"random tensors {fastest['ms_per_step']:.2f} ms/step ({fastest['mode']}): {ratio:.3f}x "
        f"(target <= {REAL_DATA_TARGET:.2f}x: {met})"
    )
    return lines


def main(argv: list[str]) -> int:
    from maeformer_fast.bench.table import format_table

    rows_path, loaders_path, log_path = map(Path, argv)
    rows = read_jsonl(rows_path)
    print("\n".join(format_table(rows)) if rows else "no random-tensor steps were measured")
    print("\n".join(feed_lines(rows, read_jsonl(loaders_path), steady_ms_per_step(log_path))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
