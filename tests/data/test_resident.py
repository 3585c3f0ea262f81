"""The memory-resident loader (data/resident.py) against the worker loader: the same batches for a
seed bit for bit on the CPU (images, labels, MAE masks), across a resume and across ranks; the
host-staged path; float16 storage; the fallback when the cache does not fit; damaged files named."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from maeformer_fast.bench.loaders import bench_loaders, limiting_verdict
from maeformer_fast.cli.main import main
from maeformer_fast.data import AugmentConfig, make_loader
from maeformer_fast.data.loaders import make_sampler
from maeformer_fast.data.resident import Volumes, resident_batches
from maeformer_fast.ops.masking import random_unit_mask
from maeformer_fast.seeds import step_generator

CROP = (48, 64, 32)  # larger than the phantoms (40x56x48) on two axes: padding is exercised
GRID = (3, 4, 2)  # mask units of the crop in the small config (16^3 voxels each)
# Every transform frequent, so a few steps exercise all of them (noise on every sample).
HEAVY = AugmentConfig(noise_prob=1.0, brightness_prob=0.5, contrast_prob=0.5, gamma_prob=0.5)


def _take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x["case_ids"] == y["case_ids"] and x["step"] == y["step"]
        assert set(x) == set(y)
        for key in set(x) - {"case_ids", "step"}:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def _loader(cache_dir: Path, on: str, **kwargs) -> Iterator[dict]:
    args = {"seed": 5, "augment_config": HEAVY, "mask": (GRID, 0.75), "num_workers": 0, **kwargs}
    return make_loader(cache_dir, CROP, 4, data_on_device=on, **args)


def test_resident_batches_equal_worker_batches_bit_for_bit(phantom_cache: Path) -> None:
    """Images, labels, masks and case ids of 4 steps equal the worker loader's, with foreground
    oversampling, padding, flips and every intensity transform; unlabeled batches too. The masks are
    the ones pretraining drew itself before the loader did (same per-step generator).

    Mutations caught: a flip read forwards (``k`` for ``size - 1 - k`` in ``Volumes.crops``):
    images differ; padded voxels pointing at the case's first voxel instead of the zero sentinel:
    images and labels differ; the intensity step skipped for resident batches (``done="all"``).
    """
    resident = _take(_loader(phantom_cache, "on", foreground_oversample=0.5), 4)
    _assert_same(_take(_loader(phantom_cache, "off", foreground_oversample=0.5), 4), resident)
    for batch in resident:
        generator = step_generator(torch.device("cpu"), 5, 0, batch["step"], "mask")
        assert torch.equal(batch["visible_ids"], random_unit_mask(4, GRID, 0.75, generator, "cpu"))
    unlabeled = _take(_loader(phantom_cache, "on", labeled=False), 2)
    assert "label" not in unlabeled[0]
    _assert_same(_take(_loader(phantom_cache, "off", labeled=False), 2), unlabeled)


def test_resident_resume_and_ranks_match_the_worker_loader(phantom_cache: Path) -> None:
    """A resident loader started at step 3 gives steps 3 and 4 of an uninterrupted worker loader;
    rank 1 of 2 gives rank 1's batches (not rank 0's), masks included.

    Mutations caught: ``resident_batches`` counting from 0 instead of ``start_step`` (step 3 gets
    step 0's batch); the mask generator seeded with rank 0 instead of ``sampler.rank`` (rank 1's masks
    equal rank 0's).
    """
    uninterrupted = _take(_loader(phantom_cache, "off"), 5)[3:]
    _assert_same(uninterrupted, _take(_loader(phantom_cache, "on", start_step=3), 2))
    rank1 = _take(_loader(phantom_cache, "on", rank=1, world_size=2), 2)
    _assert_same(_take(_loader(phantom_cache, "off", rank=1, world_size=2), 2), rank1)
    rank0 = _take(_loader(phantom_cache, "on"), 2)
    assert not torch.equal(rank0[0]["visible_ids"], rank1[0]["visible_ids"])


def test_host_staged_path_and_float16_storage(phantom_cache: Path) -> None:
    """The CUDA fallback's host-staged path (gather into host buffers one step ahead, then the copy)
    run on the CPU equals the worker loader; float16 storage (the CUDA default) gives the worker
    loader's images rounded to float16, as float32, and its labels exactly.

    Mutations caught: the prefetch handing out the next step's batch (``cut(step + 1)`` before the
    current batch is taken); the staged path dropping the labels; a missing ``.float()`` after the
    gather (float16 batch).
    """
    sampler = make_sampler(phantom_cache, CROP, 4, seed=5, augment_config=HEAVY)
    staged = resident_batches(sampler, True, torch.device("cpu"), 2, True, torch.float32, (GRID, 0.75))
    _assert_same(_take(_loader(phantom_cache, "off", start_step=2), 3), _take(staged, 3))
    plain = _take(_loader(phantom_cache, "off", augment=False), 2)
    half = _take(_loader(phantom_cache, "on", augment=False, image_dtype=torch.float16), 2)
    for x, y in zip(plain, half, strict=True):
        assert y["image"].dtype == torch.float32
        assert torch.equal(x["image"].half().float(), y["image"])
        assert torch.equal(x["label"], y["label"])


def test_auto_placement_and_fallback_with_a_log_line(phantom_cache: Path, capsys) -> None:
    """ "auto" holds a cache that fits in memory (no line on stderr); one that does not fit the share
    falls back to the worker loader with a line saying so, and still gives the same batches.

    Mutation caught: the fit test inverted (``need > share * free``): the small cache falls back.
    """
    fits = _loader(phantom_cache, "auto")
    assert fits.__name__ == "resident_batches" and capsys.readouterr().err == ""
    too_big = _loader(phantom_cache, "auto", memory_share=1e-12)
    assert too_big.__name__ == "_torch_batches"
    assert "does not fit in 0% of the free memory of cpu" in capsys.readouterr().err
    _assert_same(_take(fits, 2), _take(too_big, 2))
    with pytest.raises(ValueError, match="data_on_device must be one of"):
        _loader(phantom_cache, "yes")


def test_damaged_cache_files_are_named_when_loading_into_memory(phantom_cache: Path, tmp_path: Path) -> None:
    """A case array damaged after the sampler checked the cache (a preprocess rerun meanwhile) is
    named when the volumes are loaded, as the worker loader names it.

    Mutation caught: ``Volumes.load`` reading with ``np.load`` instead of ``open_case`` (a bare numpy
    error without the file and the rebuild hint).
    """
    damaged = Path(shutil.copytree(phantom_cache, tmp_path / "cache"))
    sampler = make_sampler(damaged, CROP, 2)
    image = damaged / "cases" / f"{sampler.case_ids[1]}_image.npy"
    image.write_bytes(image.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{image.name}: unreadable cache file"):
        Volumes.load(sampler, True, torch.device("cpu"), torch.float32)


def test_bench_loader_verdict_names_the_limiting_side() -> None:
    """``maeformer bench --loader``'s verdict on hand-made rates: a loader below the step's crops/s is
    named with its shortfall; otherwise the step limits and the slowest loader's margin is given.

    Mutation caught: the comparison inverted (``>`` for ``<``): the fast loader is blamed.
    """
    step = {"name": "training step", "crops_per_s": 100.0}
    slow = [{"name": "workers", "crops_per_s": 50.0}, {"name": "resident", "crops_per_s": 400.0}, step]
    assert limiting_verdict(slow) == "workers limits: 0.50x the crops/s the step consumes"
    fast = [{"name": "workers", "crops_per_s": 300.0}, {"name": "resident", "crops_per_s": 400.0}, step]
    assert limiting_verdict(fast) == (
        "the training step limits: the slowest loader (workers) supplies 3.0x the crops/s the step consumes"
    )


def test_bench_loaders_times_every_loader_and_the_step(phantom_cache: Path) -> None:
    """``bench_loaders`` (``maeformer bench --loader``) runs end to end at a tiny time budget and
    reports the worker and resident loaders (and DALI when installed) before the training step.

    Mutation caught: the resident loader left out of ``loader_iterators`` (its row is missing).
    """
    rows = bench_loaders(str(phantom_cache), crop_size=(32, 32, 32), device="cpu", seconds=0.01, rounds=1)
    names = [r["name"] for r in rows]
    assert names[0] == "workers" and names[-2:] == ["resident", "training step"]
    assert all(r["crops_per_s"] > 0 for r in rows)


def test_bench_loader_command_writes_its_rows_as_json_lines(phantom_cache: Path, tmp_path: Path) -> None:
    """``maeformer bench --loader --json PATH`` appends one line per loader and the step, each with the
    setting and the verdict (gpu_feed_check.sh reads them). Mutation caught: --json ignored with
    --loader (no file)."""
    path = tmp_path / "rows.jsonl"
    args = ["bench", "--loader", "--data", str(phantom_cache), "--crop-size", "32", "32", "32",
            "--device", "cpu", "--seconds", "0.03", "--num-workers", "0", "--json", str(path)]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["name"] for r in rows][-2:] == ["resident", "training step"]
    assert {r["bench"] for r in rows} == {"loader"} and {r["batch_size"] for r in rows} == {2}
    assert rows[-1]["compiled"] is False and len({r["verdict"] for r in rows}) == 1
