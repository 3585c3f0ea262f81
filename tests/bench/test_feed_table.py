"""benchmarks/feed_table.py (the table of gpu_feed_check.sh) on hand-worked logs and rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "feed_table.py"
spec = importlib.util.spec_from_file_location("feed_table", SCRIPT)
feed_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(feed_table)


def test_steady_step_time_skips_the_first_half_of_the_run(tmp_path: Path) -> None:
    """Logged every 10 steps: the first interval holds a 30 s compilation, the later ones 12, 14, 16 and
    14 ms/step; the second half (steps > 25) has intervals 30->40, 40->50: 16 and 14 ms/step: median 15.
    Mutation caught: no skip (median of all five intervals: 14 ms)."""
    elapsed = [0.0, 30.0, 30.12, 30.26, 30.42, 30.56]
    rows = "".join(f"{10 * i},1.0,1e-4,1.0,{t}\n" for i, t in enumerate(elapsed))
    log = tmp_path / "pretrain_log.csv"
    log.write_text("step,loss,lr,voxels_per_s,elapsed_s\n" + rows)
    ms, intervals = feed_table.steady_ms_per_step(log)
    assert ms == pytest.approx(15.0) and intervals == 2
    assert feed_table.steady_ms_per_step(tmp_path / "missing.csv") is None


def test_lines_name_each_ratio_and_target() -> None:
    """Hand-worked ratios against the targets; the real run is set against the fastest sparse step
    (14 ms captured), never a dense one (mutation caught: any case's fastest row: 15 / 9 = 1.667x)."""
    step = {"name": "training step", "crops_per_s": 1000.0, "compiled": True, "model": "small",
            "batch_size": 32, "num_workers": 4, "verdict": "workers limits: 0.50x"}  # fmt: skip
    loaders = [{**step, "name": "workers", "crops_per_s": 500.0},
               {**step, "name": "resident", "crops_per_s": 3500.0}, step]  # fmt: skip
    rows = [{"case": "sparse", "mode": "eager", "ms_per_step": 60.0},
            {"case": "sparse", "mode": "captured", "ms_per_step": 14.0},
            {"case": "dense", "mode": "captured", "ms_per_step": 9.0}]  # fmt: skip
    lines = feed_table.feed_lines(rows, loaders, (15.0, 20))
    assert "  resident / step 3.50x (target >= 3x: met)" in lines
    assert any("workers" in line and "0.50x the step" in line for line in lines)
    assert lines[-1].endswith("(captured): 1.071x (target <= 1.10x: met)"), lines[-1]
    slow = feed_table.feed_lines(rows, loaders, (16.0, 20))[-1]
    assert slow.endswith("1.143x (target <= 1.10x: missed)"), slow
    assert feed_table.feed_lines([], [], None) == [
        "loaders: not measured",
        "real data vs random tensors: random-tensor sparse step not measured",
    ]
