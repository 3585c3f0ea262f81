"""Preprocessing cache on real hippocampus cases and phantoms; geometry round trips; phantoms."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from maeformer_fast.data import (
    default_cache_dir,
    ensure_preprocessed,
    load_geometry,
    load_plan,
    make_phantoms,
    preprocess_dataset,
    preprocess_volume,
    read_volume,
    restore_to_original,
    write_nifti,
)

HIPPO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "Task04_Hippocampus"
needs_hippo = pytest.mark.skipif(not HIPPO.is_dir(), reason=f"hippocampus data not at {HIPPO}")


def hippo_subset(dest: Path, n: int = 6) -> Path:
    """Symlink the first ``n`` hippocampus cases into a Decathlon folder at ``dest`` (fast and small)."""
    meta = json.loads((HIPPO / "dataset.json").read_text())
    meta["training"] = meta["training"][:n]
    for sub in ("imagesTr", "labelsTr"):
        (dest / sub).mkdir(parents=True)
    for entry in meta["training"]:
        for key in ("image", "label"):
            os.symlink(HIPPO / entry[key], dest / entry[key])
    (dest / "dataset.json").write_text(json.dumps(meta))
    os.symlink(HIPPO / "README.md", dest / "README.md")
    return dest


@pytest.fixture(scope="module")
def hippo_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not HIPPO.is_dir():
        pytest.skip(f"hippocampus data not at {HIPPO}")
    root = tmp_path_factory.mktemp("hippo")
    src = hippo_subset(root / "src")
    return src, preprocess_dataset(src, root / "cache", workers=2, progress=False)


@needs_hippo
def test_hippocampus_cache_contents(hippo_cache: tuple[Path, Path]) -> None:
    src, cache = hippo_cache
    plan = load_plan(cache)
    assert plan["spacing"] == [1.0, 1.0, 1.0] and plan["num_classes"] == 3
    assert plan["normalization"] == [{"scheme": "zscore"}] and plan["channel_names"] == ["MRI"]
    assert len(plan["cases"]) == 6 and all(c["has_label"] for c in plan["cases"])
    assert "CC-BY-SA" in (cache / "README.md").read_text()  # licence note travels with the derived data
    fp = json.loads((cache / "fingerprint.json").read_text())
    assert fp["num_cases"] == 6 and len(fp["cases"]) == 6
    for case in plan["cases"]:
        image = np.load(cache / "cases" / f"{case['id']}_image.npy")
        label = np.load(cache / "cases" / f"{case['id']}_label.npy")
        assert image.dtype == np.float32 and image.flags.c_contiguous and image.ndim == 4
        assert label.dtype == np.uint8 and label.shape == image.shape[1:]
        assert abs(image.mean()) < 1e-3 and abs(image.std() - 1) < 1e-3  # per-volume z-score
        src_label = read_volume(src / "labelsTr" / f"{case['id']}.nii.gz", kind="label").data
        # Hippocampus is RAS at 1 mm: the cache is the (cropped) source transposed to (Z, Y, X).
        geo = load_geometry(cache, case["id"])
        (z0, z1), (y0, y1), (x0, x1) = geo["crop_bbox"]
        assert np.array_equal(label, src_label.transpose(2, 1, 0)[z0:z1, y0:y1, x0:x1])
        fg = np.load(cache / "cases" / f"{case['id']}_fg.npy")
        assert fg.shape[1] == 4 and np.all(label[fg[:, 1], fg[:, 2], fg[:, 3]] == fg[:, 0])
        assert set(np.unique(fg[:, 0])) == {1, 2}


@needs_hippo
def test_rerun_skips_up_to_date_cases(hippo_cache: tuple[Path, Path], tmp_path: Path) -> None:
    src, cache = hippo_cache
    stamps = {p.name: p.stat().st_mtime_ns for p in (cache / "cases").iterdir()}
    t0 = time.perf_counter()
    preprocess_dataset(src, cache, workers=2, progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "cases").iterdir()} == stamps
    # A changed source (new mtime) is redone, the others are not.
    image = src / "imagesTr" / "hippocampus_003.nii.gz"
    real = image.resolve()
    image.unlink()
    image.write_bytes(real.read_bytes())
    preprocess_dataset(src, cache, workers=1, progress=False)
    changed = {
        n for n, t in ((p.name, p.stat().st_mtime_ns) for p in (cache / "cases").iterdir()) if stamps[n] != t
    }
    assert changed == {f"hippocampus_003{s}" for s in ("_image.npy", "_label.npy", "_fg.npy", ".json")}


@needs_hippo
def test_hippocampus_round_trip_exact(hippo_cache: tuple[Path, Path]) -> None:
    src, cache = hippo_cache
    for case in load_plan(cache)["cases"][:3]:
        label = np.load(cache / "cases" / f"{case['id']}_label.npy")
        restored, affine = restore_to_original(label, load_geometry(cache, case["id"]))
        orig = read_volume(src / "labelsTr" / f"{case['id']}.nii.gz", kind="label")
        assert np.array_equal(restored, orig.data) and np.allclose(affine, orig.affine)


@needs_hippo
def test_hippocampus_resampled_round_trip(hippo_cache: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = hippo_cache
    # Integer upsampling (0.5 mm): nearest resampling there and back is exact.
    cache = preprocess_dataset(
        src, tmp_path / "half", target_spacing=(0.5, 0.5, 0.5), workers=2, progress=False
    )
    case = "hippocampus_001"
    orig = read_volume(src / "labelsTr" / f"{case}.nii.gz", kind="label")
    label = np.load(cache / "cases" / f"{case}_label.npy")
    assert label.shape == tuple(2 * s for s in load_geometry(cache, case)["ras_shape_zyx"])
    restored, _ = restore_to_original(label, load_geometry(cache, case))
    assert np.array_equal(restored, orig.data)
    # preprocess_volume on the source image reproduces the cached image (inference path = cache path).
    image, geometry = preprocess_volume(src / "imagesTr" / f"{case}.nii.gz", cache)
    assert np.allclose(image, np.load(cache / "cases" / f"{case}_image.npy"), atol=1e-5)
    assert geometry == load_geometry(cache, case)
    # Non-integer factors lose a little at boundaries but stay aligned.
    cache = preprocess_dataset(
        src, tmp_path / "odd", target_spacing=(1.3, 0.7, 1.1), workers=2, progress=False
    )
    restored, _ = restore_to_original(
        np.load(cache / "cases" / f"{case}_label.npy"), load_geometry(cache, case)
    )
    fg = orig.data > 0
    assert 2 * np.sum(fg & (restored == orig.data)) / (fg.sum() + (restored > 0).sum()) > 0.9


def _oblique_case(root: Path) -> tuple[Path, Path, np.ndarray]:
    """A synthetic non-RAS (axes permuted and flipped), anisotropic volume with a labeled block."""
    shape = (20, 16, 12)  # i, j, k
    affine = np.zeros((4, 4))
    affine[1, 0] = -1.0  # i runs posterior, 1 mm
    affine[2, 1] = 2.0  # j runs superior, 2 mm
    affine[0, 2] = -3.0  # k runs left, 3 mm
    affine[:3, 3] = (40.0, 12.0, -7.0)
    affine[3, 3] = 1.0
    rng = np.random.default_rng(3)
    image = rng.uniform(10, 20, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:9, 3:7, 2:5] = 1
    label[12:14, 9:11, 7:8] = 2
    image[label > 0] += 30
    img = write_nifti(root / "imagesTr" / "obl.nii.gz", image, affine)
    lab = write_nifti(root / "labelsTr" / "obl.nii.gz", label, affine)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "MRI"},
                "labels": {"0": "bg", "1": "a", "2": "b"},
                "training": [{"image": "./imagesTr/obl.nii.gz", "label": "./labelsTr/obl.nii.gz"}],
            }
        )
    )
    return img, lab, affine


def _world_centroid(label: np.ndarray, affine: np.ndarray, cls: int) -> np.ndarray:
    idx = np.argwhere(label == cls).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_synthetic_anisotropic_non_ras_round_trip(tmp_path: Path) -> None:
    img, lab, affine = _oblique_case(tmp_path / "src")
    # RAS (z, y, x) spacings are (2, 1, 3); target (1, 0.5, 1) upsamples by (2, 2, 3): exact round trip.
    cache = preprocess_dataset(
        tmp_path / "src", tmp_path / "cache", target_spacing=(1.0, 0.5, 1.0), workers=1, progress=False
    )
    geo = load_geometry(cache, "obl")
    assert geo["spacing_before"] == [2.0, 1.0, 3.0] and geo["spacing_after"] == [1.0, 0.5, 1.0]
    label = np.load(cache / "cases" / "obl_label.npy")
    src_label = read_volume(lab, kind="label").data
    # World positions agree: the preprocessed affine maps stored (z, y, x) indices to the same mm.
    for cls in (1, 2):
        assert np.allclose(
            _world_centroid(label, np.array(geo["preprocessed_affine"]), cls),
            _world_centroid(src_label, affine, cls),
            atol=1e-6,
        )
    # The stored array is RAS: z increases superior, y anterior, x right.
    pa = np.array(geo["preprocessed_affine"])[:3, :3]
    assert np.allclose(pa, [[0, 0, 1.0], [0, 0.5, 0], [1.0, 0, 0]])
    restored, out_affine = restore_to_original(label, geo)
    assert restored.shape == src_label.shape and np.array_equal(restored, src_label)
    assert np.allclose(out_affine, affine)
    # Saved with the source geometry, the prediction reads back identical to the source label.
    saved = read_volume(write_nifti(tmp_path / "pred.nii.gz", restored, out_affine), kind="label")
    assert np.array_equal(saved.data, src_label) and np.allclose(saved.affine, affine)
    # Default spacing (median = source): no resampling, still exact.
    cache2 = preprocess_dataset(tmp_path / "src", tmp_path / "cache2", workers=1, progress=False)
    restored2, _ = restore_to_original(
        np.load(cache2 / "cases" / "obl_label.npy"), load_geometry(cache2, "obl")
    )
    assert np.array_equal(restored2, src_label)
    with pytest.raises(ValueError, match="preprocessed shape"):
        restore_to_original(label[:-1], geo)


def test_ct_normalisation_uses_dataset_foreground_stats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    training = []
    for i in range(3):
        image = rng.normal(-800, 50, (16, 16, 16)).astype(np.float32)
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:12, 4:12, 4:12] = 1
        image[label > 0] = rng.normal(40 + 20 * i, 10, 512)
        image[0, 0, 0] = 3000.0  # an outlier the clipping must remove
        write_nifti(tmp_path / "ct" / "imagesTr" / f"c{i}.nii.gz", image, np.eye(4))
        write_nifti(tmp_path / "ct" / "labelsTr" / f"c{i}.nii.gz", label, np.eye(4))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (tmp_path / "ct" / "dataset.json").write_text(
        json.dumps({"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "organ"}, "training": training})
    )
    plan = load_plan(preprocess_dataset(tmp_path / "ct", tmp_path / "cache", workers=1, progress=False))
    norm = plan["normalization"][0]
    assert norm["scheme"] == "ct" and 0 < norm["lower"] < 60 < norm["upper"] < 150 and 40 < norm["mean"] < 80
    image = np.load(tmp_path / "cache" / "cases" / "c0_image.npy")
    assert image.max() <= (norm["upper"] - norm["mean"]) / norm["std"] + 1e-4
    # --modality MRI overrides the channel name.
    plan = load_plan(
        preprocess_dataset(tmp_path / "ct", tmp_path / "c2", modality="MRI", workers=1, progress=False)
    )
    assert plan["normalization"] == [{"scheme": "zscore"}]


def test_phantoms_deterministic_and_preprocess(tmp_path: Path) -> None:
    a = make_phantoms(
        tmp_path / "a", num_labeled=3, num_unlabeled=2, shape=(20, 24, 28), num_classes=4, seed=5
    )
    b = make_phantoms(
        tmp_path / "b", num_labeled=3, num_unlabeled=2, shape=(20, 24, 28), num_classes=4, seed=5
    )
    c = make_phantoms(
        tmp_path / "c", num_labeled=3, num_unlabeled=2, shape=(20, 24, 28), num_classes=4, seed=6
    )
    va = read_volume(a / "imagesTr" / "phantom_001.nii.gz").data
    assert np.array_equal(va, read_volume(b / "imagesTr" / "phantom_001.nii.gz").data)
    assert not np.array_equal(va, read_volume(c / "imagesTr" / "phantom_001.nii.gz").data)
    for i in range(3):
        lab = read_volume(a / "labelsTr" / f"phantom_{i:03d}.nii.gz", kind="label").data
        assert set(np.unique(lab)) == {0, 1, 2, 3}  # every class present in every labeled case
    for inside in (a, a / "cache"):  # the cache would mix its files into the dataset
        with pytest.raises(ValueError, match="must not be the dataset folder"):
            preprocess_dataset(a, inside, workers=2, progress=False)
    assert not (a / "plan.json").exists() and not (a / "cache").exists()
    cache = preprocess_dataset(a, tmp_path / "cache", workers=2, progress=False)
    plan = load_plan(cache)
    assert [(c["split"], c["has_label"]) for c in plan["cases"]] == [("train", True)] * 3 + [
        ("test", False)
    ] * 2
    assert np.load(cache / "cases" / "phantom_004_image.npy").shape[0] == 1
    geo = load_geometry(cache, "phantom_000")
    assert geo["ras_shape_zyx"] == [20, 24, 28]  # shape is (Z, Y, X) of the preprocessed arrays


def test_phantoms_default_dataset(tmp_path: Path) -> None:
    """The default phantoms: 24 labeled and 24 unlabeled 48x64x64 volumes (NIfTI order X, Y, Z). No
    time is asserted (benchmarks measure time; a loaded CI machine made a 10 s bound fail). Catches a
    changed default (tried: ``num_unlabeled: int = 12``)."""
    import nibabel as nib

    root = make_phantoms(tmp_path / "p")
    counts = [len(list((root / sub).iterdir())) for sub in ("imagesTr", "labelsTr", "imagesTs")]
    assert counts == [24, 24, 24]
    assert nib.load(root / "imagesTs" / "phantom_024.nii.gz").shape == (64, 64, 48)


def test_ensure_preprocessed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_phantoms(tmp_path / "data" / "ph", num_labeled=2, num_unlabeled=1, shape=(16, 16, 16))
    cache = ensure_preprocessed(src, workers=1, progress=False)
    assert cache == tmp_path / "data" / "ph_maeformer_cache" == default_cache_dir(src)
    assert ensure_preprocessed(cache) == cache  # a cache is returned as is
    assert (
        ensure_preprocessed(src, tmp_path / "elsewhere", workers=1, progress=False) == tmp_path / "elsewhere"
    )
    # Read-only parent: the cache goes under ~/.cache/maeformer_fast/<name>-<hash>.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    ro = default_cache_dir(src)
    assert ro.parent == tmp_path / "xdg" / "maeformer_fast" and ro.name.startswith("ph-")


def test_read_only_folder_counts_as_read_only_even_for_root(tmp_path: Path) -> None:
    src = make_phantoms(tmp_path / "shared" / "ph", num_labeled=1, num_unlabeled=0, shape=(8, 8, 8))
    (tmp_path / "shared").chmod(0o555)  # root passes os.access; the mode bits still say read-only
    try:
        assert default_cache_dir(src).parent.name == "maeformer_fast"
    finally:
        (tmp_path / "shared").chmod(0o755)


def test_cli_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from maeformer_fast.cli.data import add_commands

    parser = argparse.ArgumentParser(prog="maeformer")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "make-phantoms",
            str(tmp_path / "p"),
            "--labeled",
            "2",
            "--unlabeled",
            "1",
            "--shape",
            "16,16,20",
            "--classes",
            "2",
            "--seed",
            "3",
        ]
    )
    assert args.func(args) == 0
    args = parser.parse_args(
        [
            "preprocess",
            str(tmp_path / "p"),
            str(tmp_path / "c"),
            "--spacing",
            "1,1,2",
            "--workers",
            "1",
            "--modality",
            "MRI",
        ]
    )
    assert args.func(args) == 0
    assert load_plan(tmp_path / "c")["spacing"] == [1.0, 1.0, 2.0]
    (tmp_path / "empty").mkdir()
    from maeformer_fast.cli.main import main

    assert main(["preprocess", str(tmp_path / "empty"), str(tmp_path / "c2"), "--skip-bad"]) == 2
    last_report = capsys.readouterr().err.split("\r")[-1]  # after the earlier progress bars
    assert "maeformer preprocess: error: 1 problem(s) in dataset" in last_report
    assert "empty folder" in last_report


def test_a_damaged_cache_is_rebuilt_by_preprocess_and_by_a_train_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The repair the loader's error asks for works: a truncated cached array makes `maeformer
    pretrain` stop naming it; `maeformer preprocess` then rebuilds that case (sources and plan
    unchanged) and training runs; a train command given the raw folder repairs its cache the same way.
    Catches a rerun that trusts the case record alone (tried: the array check taken out of
    ``_up_to_date``: preprocess skipped the case and the next run stopped on the same file)."""
    from maeformer_fast.cli.main import main

    src = make_phantoms(tmp_path / "ph", num_labeled=2, num_unlabeled=1, shape=(16, 16, 16))
    cache = tmp_path / "cache"
    assert main(["preprocess", str(src), str(cache), "--workers", "1"]) == 0
    image = sorted((cache / "cases").glob("*_image.npy"))[0]
    intact = image.read_bytes()

    def pretrain(out: str, data: Path, *extra: str) -> int:
        return main(["pretrain", "--data", str(data), "--out", str(tmp_path / out), "--steps", "1",
                     "--batch-size", "1", "--num-workers", "0", "--crop-size", "32", "32", "32",
                     "--no-progress", *extra])  # fmt: skip

    image.write_bytes(intact[: len(intact) // 2])
    assert pretrain("broken", cache) == 2
    assert f"{image}: unreadable cache file" in capsys.readouterr().err
    assert main(["preprocess", str(src), str(cache), "--workers", "1"]) == 0
    assert f"preprocess: {image}: damaged cache file" in capsys.readouterr().err
    assert image.read_bytes() == intact
    assert pretrain("repaired", cache) == 0

    image.write_bytes(b"")  # emptied, then a train command on the raw folder with this cache
    assert pretrain("from_raw", src, "--cache-dir", str(cache)) == 0
    assert f"preprocess: {image}: damaged cache file" in capsys.readouterr().err
    assert image.read_bytes() == intact
