"""`maeformer bench --flops-cache`: each case's FLOPs are counted once across processes (the GPU scripts
run several benches of the same cases), and a warm-up (``--no-flops``) counts none."""

from __future__ import annotations

from pathlib import Path

from maeformer_fast.bench import steps


def test_counted_once_per_case_and_scaled_by_the_batch(monkeypatch, tmp_path: Path) -> None:
    """A fake counter returning 1000 FLOPs per sample, called through the cache for batch 8 then 2: one
    count (of one sample), 8000 then 2000; another case or crop is counted anew. Mutations caught: the
    cache keyed without the crop (the second crop reads 1000 per sample from the first); the batch's
    count cached (8000 stored, 16000 returned for batch 2)."""
    calls = []

    def fake(case, model, crop, batch_size, overrides):
        calls.append((case, tuple(crop), batch_size))
        return 1000 * batch_size * (2 if tuple(crop) == (16, 16, 16) else 1)

    monkeypatch.setattr(steps, "case_flops", fake)
    cache = tmp_path / "flops.json"
    assert steps.cached_case_flops(cache, "sparse", "small", (32, 48, 32), 8, {}) == 8000
    assert steps.cached_case_flops(cache, "sparse", "small", (32, 48, 32), 2, {}) == 2000
    assert steps.cached_case_flops(cache, "sparse", "small", (16, 16, 16), 2, {}) == 4000
    assert steps.cached_case_flops(cache, "dense", "small", (32, 48, 32), 1, {}) == 1000
    assert calls == [("sparse", (32, 48, 32), 1), ("sparse", (16, 16, 16), 1), ("dense", (32, 48, 32), 1)]


def test_a_warm_up_counts_no_flops(monkeypatch) -> None:
    """``count_flops`` off (``--no-flops``: the GPU scripts' compile warm-ups): the row is measured, no
    FLOPs are counted. Mutation caught: counting whenever a row has ``ms_per_step`` (the counter is
    called)."""

    def never(*args):
        raise AssertionError("FLOPs counted in a warm-up")

    monkeypatch.setattr(steps, "cached_case_flops", never)
    rows = steps.bench("small", (16, 16, 16), 1, "cpu", "fp32", 0.0, False, {"embed_dim": 8},
                       modes=["eager"], cases=["sparse"], count_flops=False)  # fmt: skip
    assert "ms_per_step" in rows[0] and "flops" not in rows[0]
