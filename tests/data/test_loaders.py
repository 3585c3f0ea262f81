"""Loaders: shapes, dtypes, crops against the source arrays, flips, label alignment, determinism,
exact resume, rank sharding, foreground oversampling, padding, the DALI backend (CPU) across its pipeline
rebuilds, and damaged cache files named, up front or by a worker."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maeformer_fast.data import AugmentConfig, load_plan, make_loader, make_phantoms, preprocess_dataset
from maeformer_fast.data.cache import open_case
from maeformer_fast.data.loaders import make_sampler

from .test_preprocess import HIPPO, hippo_subset

NO_INTENSITY = AugmentConfig(noise_prob=0, brightness_prob=0, contrast_prob=0, gamma_prob=0)
HAS_DALI = (
    importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hippocampus subset cache (phantoms of the same size when the data is missing)."""
    root = tmp_path_factory.mktemp("loaders")
    if HIPPO.is_dir():
        src = hippo_subset(root / "src")
    else:
        src = make_phantoms(root / "src", num_labeled=6, num_unlabeled=0, shape=(36, 50, 35))
    return preprocess_dataset(src, root / "cache", workers=2, progress=False)


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ph")
    src = make_phantoms(root / "src", num_labeled=3, num_unlabeled=3, shape=(20, 24, 28))
    return preprocess_dataset(src, root / "cache", workers=2, progress=False)


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(
        torch.equal(x["image"], y["image"])
        and torch.equal(x["label"], y["label"])
        and x["case_ids"] == y["case_ids"]
        for x, y in zip(a, b, strict=True)
    )


def _expected(cache: Path, sampler, step: int, crop: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Crops computed independently: pad the whole source volume, then slice."""
    plan = sampler.plan(step)
    images, labels = [], []
    for case, start in zip(plan.cases, plan.starts, strict=True):
        image, label = open_case(cache, sampler.case_ids[case], True)
        pad = [(max(0, -s), max(0, s + c - n)) for s, c, n in zip(start, crop, label.shape, strict=True)]
        lab = np.pad(label, pad)
        img = np.pad(image, [(0, 0), *pad])
        sl = tuple(slice(s + p[0], s + p[0] + c) for s, p, c in zip(start, pad, crop, strict=True))
        images.append(img[(slice(None), *sl)])
        labels.append(lab[sl])
    return np.stack(images), np.stack(labels)


def test_shapes_dtypes_and_crops_match_source(cache: Path) -> None:
    crop = (32, 48, 32)
    it = make_loader(cache, crop, 4, augment=False, num_workers=0, seed=1)
    sampler = make_sampler(cache, crop, 4, augment=False, seed=1)
    for step, batch in enumerate(_take(it, 3)):
        assert batch["image"].shape == (4, 1, *crop) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (4, *crop) and batch["label"].dtype == torch.int64
        assert len(batch["case_ids"]) == 4 and batch["step"] == step
        image, label = _expected(cache, sampler, step, crop)
        assert np.array_equal(batch["image"].numpy(), image) and np.array_equal(batch["label"].numpy(), label)


def test_flips_keep_label_alignment(cache: Path) -> None:
    crop = (24, 24, 24)
    plain = _take(make_loader(cache, crop, 8, augment=False, num_workers=0), 2)
    flipped = _take(make_loader(cache, crop, 8, augment_config=NO_INTENSITY, num_workers=0), 2)
    sampler = make_sampler(cache, crop, 8)
    n_flipped = 0
    for step, (p, f) in enumerate(zip(plain, flipped, strict=True)):
        for b, flips in enumerate(sampler.plan(step).flips):
            axes = [a for a in range(3) if flips[a]]
            n_flipped += bool(axes)
            assert torch.equal(
                f["image"][b], p["image"][b].flip([1 + a for a in axes]) if axes else p["image"][b]
            )
            assert torch.equal(f["label"][b], p["label"][b].flip(axes) if axes else p["label"][b])
    assert n_flipped > 8


def test_intensity_augmentation_changes_some_samples_only(cache: Path) -> None:
    crop = (16, 16, 16)
    plain = next(make_loader(cache, crop, 32, augment=False, num_workers=0))["image"]
    cfg = AugmentConfig(flip_prob=0.0)
    aug = next(make_loader(cache, crop, 32, augment_config=cfg, num_workers=0))["image"]
    intensity = make_sampler(cache, crop, 32, augment_config=cfg).plan(0).intensity
    identity = np.all(intensity == np.array([1, 1, 1, 0], np.float32), axis=1)
    assert 0 < identity.sum() < 32
    for b in range(32):
        assert torch.equal(aug[b], plain[b]) == bool(identity[b])
    assert torch.isfinite(aug).all()


def test_intensity_augmentation_never_reads_device_values() -> None:
    # On a GPU a host read of a device tensor waits for all queued work. The meta device has no
    # values at all, so any such read (e.g. a bool() of the gamma parameters) fails here.
    from maeformer_fast.data.augment import apply_intensity

    image = torch.zeros(2, 1, 8, 8, 8, device="meta")
    intensity = torch.tensor([[1.1, 0.9, 1.3, 0.0], [1.0, 1.0, 1.0, 0.0]])  # contrast and gamma on
    assert apply_intensity(image, intensity, torch.tensor([1, 2])).shape == image.shape


def test_deterministic_workers_and_seeds(cache: Path) -> None:
    crop = (24, 32, 24)
    a = _take(make_loader(cache, crop, 2, num_workers=0, seed=3), 4)
    b = _take(make_loader(cache, crop, 2, num_workers=2, seed=3), 4)
    c = _take(make_loader(cache, crop, 2, num_workers=0, seed=4), 4)
    assert _same(a, b)
    assert not _same(a, c)


def test_resume_sees_the_same_batches(cache: Path) -> None:
    crop = (24, 32, 24)
    # Always-on noise etc. so the resumed augmentation is checked too, not only the crops.
    cfg = AugmentConfig(noise_prob=1.0, brightness_prob=0.5, contrast_prob=0.5, gamma_prob=0.5)
    full = _take(make_loader(cache, crop, 3, seed=7, augment_config=cfg, num_workers=1), 6)
    resumed = _take(make_loader(cache, crop, 3, seed=7, start_step=4, augment_config=cfg, num_workers=1), 2)
    assert _same(full[4:], resumed)
    assert [r["step"] for r in resumed] == [4, 5]


def test_ranks_draw_different_samples(cache: Path) -> None:
    crop = (24, 32, 24)
    r0 = _take(make_loader(cache, crop, 4, rank=0, world_size=2, num_workers=0), 3)
    r1 = _take(make_loader(cache, crop, 4, rank=1, world_size=2, num_workers=0), 3)
    assert not any(torch.equal(x["image"], y["image"]) for x, y in zip(r0, r1, strict=True))
    s0 = make_sampler(cache, crop, 4, rank=0).plan(0)
    s1 = make_sampler(cache, crop, 4, rank=1).plan(0)
    assert not np.array_equal(s0.starts, s1.starts)
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        make_loader(cache, crop, 4, rank=2, world_size=2)


def test_foreground_oversampling(cache: Path) -> None:
    crop = (8, 8, 8)  # small crops: random ones often miss the hippocampus
    sampler = make_sampler(cache, crop, 64, foreground_oversample=0.33)
    flags = np.concatenate([sampler.plan(s).foreground for s in range(10)])
    assert 0.25 < flags.mean() < 0.41
    always = next(make_loader(cache, crop, 64, foreground_oversample=1.0, augment=False, num_workers=0))
    centre = always["label"][:, 4, 4, 4]
    assert bool((centre > 0).all())  # the crop centre is the chosen foreground voxel
    never = next(make_loader(cache, crop, 64, foreground_oversample=0.0, augment=False, num_workers=0))
    hit_never = (never["label"].flatten(1) > 0).any(1).float().mean()
    assert hit_never < 0.9
    # Both classes get picked (a random class, then a random voxel of it).
    assert set(centre.unique().tolist()) == {1, 2}


def test_small_volumes_are_padded(cache: Path) -> None:
    crop = (48, 64, 48)  # larger than every hippocampus volume on every axis
    batch = next(make_loader(cache, crop, 4, augment=False, num_workers=0))
    assert batch["image"].shape == (4, 1, *crop)
    for b, case in enumerate(batch["case_ids"]):
        image, label = open_case(cache, case, True)
        assert int((batch["label"][b] > 0).sum()) == int((np.asarray(label) > 0).sum())  # nothing cut off
        assert int((batch["image"][b] != 0).sum()) == int(np.count_nonzero(image))


def test_unlabeled_and_case_selection(phantom_cache: Path) -> None:
    plan = load_plan(phantom_cache)
    batch = next(make_loader(phantom_cache, (16, 16, 16), 8, labeled=False, num_workers=0))
    assert "label" not in batch and batch["image"].shape == (8, 1, 16, 16, 16)
    ids = {c["id"] for c in plan["cases"]}
    assert set(batch["case_ids"]) <= ids
    unl = [c["id"] for c in plan["cases"] if not c["has_label"]]
    batch = next(make_loader(phantom_cache, (16, 16, 16), 8, labeled=False, cases=unl, num_workers=0))
    assert set(batch["case_ids"]) <= set(unl)
    batch = next(make_loader(phantom_cache, (16, 16, 16), 16, num_workers=0))
    assert set(batch["case_ids"]) <= ids - set(unl)
    with pytest.raises(ValueError, match="have no label"):
        make_loader(phantom_cache, (16, 16, 16), 2, cases=unl[:1])
    with pytest.raises(KeyError, match="not in the cache"):
        make_loader(phantom_cache, (16, 16, 16), 2, cases=["nope"])
    with pytest.raises(ValueError, match="backend"):
        make_loader(phantom_cache, (16, 16, 16), 2, backend="tf")


@pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali not installed (pip install -e .[dali])")
def test_dali_cpu_matches_torch(cache: Path) -> None:
    crop = (32, 48, 32)
    for kwargs in ({"augment": False}, {"augment_config": NO_INTENSITY}, {"start_step": 3}):
        t = _take(make_loader(cache, crop, 4, backend="torch", num_workers=0, seed=2, **kwargs), 3)
        d = _take(make_loader(cache, crop, 4, backend="dali", num_workers=1, seed=2, **kwargs), 3)
        assert [x["case_ids"] for x in t] == [x["case_ids"] for x in d]
        for x, y in zip(t, d, strict=True):
            assert y["image"].dtype == torch.float32 and y["label"].dtype == torch.int64
            assert torch.equal(x["label"], y["label"])
            assert torch.allclose(x["image"], y["image"], atol=1e-5), kwargs
    batch = next(make_loader(cache, crop, 2, backend="dali", labeled=False, num_workers=1))
    assert "label" not in batch and batch["image"].shape == (2, 1, *crop)


@pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali not installed (pip install -e .[dali])")
def test_dali_cpu_matches_torch_across_pipeline_rebuilds(phantom_cache: Path) -> None:
    """DALI builds a new pipeline (a new file list and parameter feed) every ``dali.WINDOW`` steps
    counted from ``start_step``: 2 * WINDOW + 4 steps from step 2 cross two rebuilds, and every batch
    (step, case ids, labels, images with flips, brightness, contrast and gamma) equals the torch
    loader's bit for bit (measured: max difference 0; noise is off, see test_augment.py's DALI tests).
    Tiny crops keep the 2 x 516 steps under a second or two.

    Mutation seen failing: the pipeline built once and reused (no rebuild: from step 258 on, the
    reader wraps to the first window's files and the feed to its starts and flips; steps and case ids,
    which come from the plan, still match, the labels of step 258 do not).
    """
    from maeformer_fast.data import dali

    crop, steps = (8, 8, 8), 2 * dali.WINDOW + 4
    config = AugmentConfig(noise_prob=0.0, brightness_prob=0.5, contrast_prob=0.5, gamma_prob=0.5)
    kwargs = {"seed": 9, "start_step": 2, "augment_config": config}
    t = _take(make_loader(phantom_cache, crop, 2, backend="torch", num_workers=0, **kwargs), steps)
    d = _take(make_loader(phantom_cache, crop, 2, backend="dali", num_workers=1, **kwargs), steps)
    for x, y in zip(t, d, strict=True):
        assert x["step"] == y["step"] and x["case_ids"] == y["case_ids"], x["step"]
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["image"], y["image"]), x["step"]
    assert [x["step"] for x in d] == list(range(2, 2 + steps))


def test_a_worker_error_names_the_damaged_file(
    phantom_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An image file damaged after ``make_loader`` checked the cache (a preprocess rerun meanwhile) is
    first read by a real DataLoader worker (``num_workers=1``): the error torch re-raises in the main
    process ends with the file, what is wrong and the rebuild hint, and the CLI turns that real error
    into one line naming the file.

    Mutations seen failing: ``cached_array`` not catching ValueError (the last line is numpy's bare
    "mmap length is greater than file size"); the CLI keeping the first line of a worker error
    (``splitlines()[0]``: "Caught ValueError in DataLoader worker process 0.").
    """
    # The module, not the ``main`` function that ``maeformer_fast.cli`` re-exports under the same name.
    cli = importlib.import_module("maeformer_fast.cli.main")

    damaged = Path(shutil.copytree(phantom_cache, tmp_path / "cache"))
    batches = make_loader(damaged, (16, 16, 16), 2, labeled=False, num_workers=1, seed=0)
    sampler = make_sampler(damaged, (16, 16, 16), 2, labeled=False, seed=0)
    image = damaged / "cases" / f"{sampler.case_ids[sampler.plan(0).cases[0]]}_image.npy"
    image.write_bytes(image.read_bytes()[:200])  # header intact, data cut off
    with pytest.raises(ValueError, match="in DataLoader worker process 0") as caught:
        next(batches)
    last = str(caught.value).strip().splitlines()[-1]
    assert last.startswith(f"ValueError: {image}: unreadable cache file (")
    assert last.endswith("); rebuild the cache with `maeformer preprocess`")

    def fails_in_a_worker(args: object) -> int:
        raise caught.value

    monkeypatch.setattr(cli, "cmd_evaluate", fails_in_a_worker)
    assert cli.main(["evaluate", "--pred", "p", "--ref", "r"]) == 2
    assert capsys.readouterr().err == f"maeformer evaluate: error: in a data loader worker: {last}\n"


def test_a_damaged_foreground_file_is_named(phantom_cache: Path, tmp_path: Path) -> None:
    """A truncated foreground-voxel file (read when a crop is centred on foreground) must be named,
    either by ``make_loader``'s up-front check or by the worker's error, as image and label files are.

    Mutation seen failing: ``CropSampler._foreground_voxel`` reading the file with a bare ``np.load``
    (the bug this found: the error ended with numpy's "EOF: reading array header, expected 118 bytes
    got 90", without the file).
    """
    damaged = Path(shutil.copytree(phantom_cache, tmp_path / "cache"))
    for fg in (damaged / "cases").glob("*_fg.npy"):
        fg.write_bytes(fg.read_bytes()[:100])
    with pytest.raises(ValueError) as caught:
        next(make_loader(damaged, (16, 16, 16), 2, num_workers=1, foreground_oversample=1.0))
    assert re.search(r"_fg\.npy: unreadable cache file", str(caught.value)), str(caught.value)


def test_damaged_cache_files_are_named_before_training(phantom_cache: Path, tmp_path: Path) -> None:
    import shutil

    damaged = Path(shutil.copytree(phantom_cache, tmp_path / "cache"))
    label = damaged / "cases" / "phantom_001_label.npy"
    label.unlink()
    make_loader(damaged, (16, 16, 16), 2, labeled=False, num_workers=0)  # labels not needed: fine
    with pytest.raises(ValueError, match="phantom_001_label.npy: unreadable cache file"):
        make_loader(damaged, (16, 16, 16), 2, labeled=True, num_workers=0)
    image = damaged / "cases" / "phantom_002_image.npy"
    for damage in (image.read_bytes()[:200], b""):  # truncated, empty
        image.write_bytes(damage)
        with pytest.raises(ValueError, match="phantom_002_image.npy: unreadable cache file"):
            make_loader(damaged, (16, 16, 16), 2, labeled=False, num_workers=0)
