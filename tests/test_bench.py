"""`maeformer bench`: every training step is timed, with finite losses, and the CLI prints the table."""

import math
from types import SimpleNamespace

import pytest
import torch

from maeformer_fast.cli import main
from maeformer_fast.train import bench as bench_module
from maeformer_fast.train.bench import bench

TINY = {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}


def test_bench_times_each_training_step():
    rows = bench(crop_size=(32, 32, 32), batch_size=1, seconds=0.0, model_overrides=TINY)
    assert [(r["task"], r["mode"]) for r in rows] == [("pretrain", "sparse"), ("pretrain", "dense"),
                                                     ("finetune", "dense")]  # fmt: skip
    for r in rows:
        assert r["steps"] >= 3 and r["ms_per_step"] > 0 and math.isfinite(r["loss"])
        assert r["precision"] == "fp32"


def test_step_timing_on_a_fake_clock(monkeypatch):
    """Steps of 0.1 s on a clock the test controls, worked out by hand: 2 warm-up steps (0.2 s, not
    timed), then steps until 0.35 s have passed: 4 steps, 100 ms each. Catches warm-up counted in the
    timing (tried: ``time_steps`` timed from the clock's zero) and a miscounted rate (tried:
    ``(steps + 1) / elapsed``)."""
    clock = [0.0]
    monkeypatch.setattr(bench_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def step() -> float:
        clock[0] += 0.1
        return 2.5

    row = bench_module.measure_step(step, 1000, torch.device("cpu"), seconds=0.35, warmup_steps=2)
    assert row["warmup_s"] == pytest.approx(0.2) and row["steps"] == 4 and row["loss"] == 2.5
    assert row["ms_per_step"] == pytest.approx(100) and row["steps_per_s"] == pytest.approx(10)
    assert row["voxels_per_s"] == pytest.approx(10_000)


def test_bench_command_prints_the_table_and_the_ratio(capsys):
    assert main(["bench", "--seconds", "0", "--crop-size", "32", "32", "32", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("pretrain sparse", "pretrain dense", "finetune dense"))
    assert "sparse / dense pretraining speed: " in out
