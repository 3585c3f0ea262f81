"""`maeformer bench`: every training step is timed, with finite losses, and the CLI prints the table."""

import math

from maeformer_fast.cli import main
from maeformer_fast.train.bench import bench

TINY = {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}


def test_bench_times_each_training_step():
    rows = bench(crop_size=(32, 32, 32), batch_size=1, seconds=0.0, model_overrides=TINY)
    assert [(r["task"], r["mode"]) for r in rows] == [("pretrain", "sparse"), ("pretrain", "dense"),
                                                     ("finetune", "dense")]  # fmt: skip
    for r in rows:
        assert r["steps"] >= 3 and r["ms_per_step"] > 0 and math.isfinite(r["loss"])
        assert r["voxels_per_s"] == 32**3 * r["steps_per_s"] and r["precision"] == "fp32"


def test_bench_command_prints_the_table_and_the_ratio(capsys):
    assert main(["bench", "--seconds", "0", "--crop-size", "32", "32", "32", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("pretrain sparse", "pretrain dense", "finetune dense"))
    assert "sparse / dense pretraining speed: " in out
