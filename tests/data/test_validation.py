"""Every bad-input case gives a clear error naming the file and the problem; a scan reports all."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from maeformer_fast.data import DatasetError, load_plan, preprocess_dataset, read_volume, write_nifti

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
SHAPE = (12, 10, 8)


def _pair(seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.uniform(1, 100, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[3:7, 3:6, 2:5] = 1
    label[7:9, 5:8, 4:6] = 2
    return image, label


def _dataset(root: Path, n: int = 3, *, listed: bool = True, channels: tuple[str, ...] = ("MRI",)) -> Path:
    """A small valid Decathlon dataset with ``n`` labeled cases case_000..."""
    training = []
    for i in range(n):
        image, label = _pair(i)
        write_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", image, AFFINE)
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, AFFINE)
        training.append(
            {"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"}
        )
    meta = {
        "name": "Tiny",
        "modality": {str(i): c for i, c in enumerate(channels)},
        "labels": {"0": "background", "1": "a", "2": "b"},
    }
    if listed:
        meta["training"] = training
        meta["test"] = []
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _errors(src: Path, tmp_path: Path) -> list[tuple[str, str]]:
    with pytest.raises(DatasetError) as info:
        preprocess_dataset(src, tmp_path / "cache", workers=1, progress=False)
    return [(Path(p.path).name, p.message) for p in info.value.problems]


def _only(errors: list[tuple[str, str]]) -> tuple[str, str]:
    assert len(errors) == 1, errors
    return errors[0]


def test_valid_tiny_dataset_preprocesses(tmp_path: Path) -> None:
    out = preprocess_dataset(_dataset(tmp_path / "ds"), tmp_path / "cache", workers=1, progress=False)
    plan = load_plan(out)
    assert [c["id"] for c in plan["cases"]] == ["case_000", "case_001", "case_002"]
    assert plan["num_classes"] == 3


def test_unreadable_file(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    (src / "imagesTr" / "case_001.nii.gz").write_bytes(b"this is not a nifti file at all" * 20)
    name, msg = _only(_errors(src, tmp_path))
    assert name == "case_001.nii.gz" and "unreadable NIfTI" in msg


def test_truncated_file(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    path = src / "imagesTr" / "case_002.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2])[:-20])  # gzip stream cut short mid-voxels
    name, msg = _only(_errors(src, tmp_path))
    assert name == "case_002.nii.gz" and "truncated or corrupt" in msg


def test_truncated_uncompressed_file(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "x.nii", _pair(0)[0], AFFINE)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(DatasetError, match=r"x\.nii: truncated or corrupt"):
        read_volume(path)


def test_shape_mismatch(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    write_nifti(src / "labelsTr" / "case_000.nii.gz", np.zeros((12, 10, 9), np.uint8), AFFINE)
    name, msg = _only(_errors(src, tmp_path))
    assert name == "case_000.nii.gz" and "does not match image shape" in msg and "(12, 10, 9)" in msg


def test_affine_mismatch(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    write_nifti(src / "labelsTr" / "case_001.nii.gz", _pair(1)[1], shifted)
    name, msg = _only(_errors(src, tmp_path))
    assert name == "case_001.nii.gz" and "label affine does not match image affine" in msg


def test_label_without_image(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds", listed=False)
    write_nifti(src / "labelsTr" / "orphan.nii.gz", _pair(0)[1], AFFINE)
    name, msg = _only(_errors(src, tmp_path))
    assert name == "orphan.nii.gz" and msg == "label without image"


def test_image_without_label(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds", listed=False)
    write_nifti(src / "imagesTr" / "lonely.nii.gz", _pair(0)[0], AFFINE)
    name, msg = _only(_errors(src, tmp_path))
    assert name == "lonely.nii.gz" and "image without label" in msg


def test_dataset_json_names_missing_files(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    (src / "imagesTr" / "case_000.nii.gz").unlink()
    (src / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DatasetError) as info:
        preprocess_dataset(src, tmp_path / "cache", workers=1, progress=False)
    found = {(Path(p.path).parent.name, Path(p.path).name, p.message) for p in info.value.problems}
    assert found == {
        ("imagesTr", "case_000.nii.gz", "dataset.json names a missing file (image not found)"),
        ("labelsTr", "case_000.nii.gz", "label without image"),
        ("labelsTr", "case_002.nii.gz", "dataset.json names a missing file (image without label)"),
    }


def test_label_values_outside_declared_classes(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    label = _pair(2)[1]
    label[0, 0, 0] = 7
    write_nifti(src / "labelsTr" / "case_002.nii.gz", label, AFFINE)
    name, msg = _only(_errors(src, tmp_path))
    assert name == "case_002.nii.gz" and "outside the declared classes [0, 1, 2]: 7" in msg


def test_non_integer_label(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    write_nifti(src / "labelsTr" / "case_002.nii.gz", _pair(2)[1].astype(np.float32) * 0.5, AFFINE)
    assert "non-integer" in _only(_errors(src, tmp_path))[1]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_inf_voxels(tmp_path: Path, value: float) -> None:
    src = _dataset(tmp_path / "ds")
    image = _pair(1)[0]
    image[2, 2, 2] = value
    image[3, 3, 3] = value
    write_nifti(src / "imagesTr" / "case_001.nii.gz", image, AFFINE)
    name, msg = _only(_errors(src, tmp_path))
    assert name == "case_001.nii.gz" and "2 NaN/Inf voxel(s) in image" in msg


def test_4d_where_3d_expected(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    write_nifti(src / "imagesTr" / "case_000.nii.gz", np.stack([_pair(0)[0]] * 2, axis=-1), AFFINE)
    name, msg = _only(_errors(src, tmp_path))
    assert name == "case_000.nii.gz" and "4D image where 3D expected" in msg


def test_4d_label(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    write_nifti(src / "labelsTr" / "case_000.nii.gz", _pair(0)[1][..., None], AFFINE)
    assert "4D label where 3D expected" in _only(_errors(src, tmp_path))[1]


def test_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert "empty folder" in _only(_errors(tmp_path / "plain", tmp_path))[1]
    (tmp_path / "dec" / "imagesTr").mkdir(parents=True)
    (tmp_path / "dec" / "dataset.json").write_text(json.dumps({"training": [], "test": []}))
    assert "empty folder" in _only(_errors(tmp_path / "dec", tmp_path))[1]
    assert "does not exist" in _only(_errors(tmp_path / "nowhere", tmp_path))[1]
    assert "a file, not a dataset folder" in _only(_errors(tmp_path / "dec" / "dataset.json", tmp_path))[1]


def test_invalid_dataset_json(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds")
    (src / "dataset.json").write_text("{not json")
    name, msg = _only(_errors(src, tmp_path))
    assert name == "dataset.json" and "invalid dataset.json" in msg


def _break_three(src: Path) -> None:
    image = _pair(0)[0]
    image[1, 1, 1] = np.nan
    write_nifti(src / "imagesTr" / "case_000.nii.gz", image, AFFINE)
    (src / "imagesTr" / "case_001.nii.gz").write_bytes(b"garbage")
    write_nifti(src / "labelsTr" / "case_002.nii.gz", np.full(SHAPE, 9, np.uint8), AFFINE)


def test_all_bad_cases_reported_at_once(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds", n=5)
    _break_three(src)
    with pytest.raises(DatasetError) as info:
        preprocess_dataset(src, tmp_path / "cache", workers=2, progress=False)
    text = str(info.value)
    assert "3 problem(s)" in text
    for frag in (
        "case_000.nii.gz: 1 NaN/Inf",
        "case_001.nii.gz: unreadable",
        "case_002.nii.gz: label values",
    ):
        assert frag in text


def test_skip_bad_warns_and_keeps_good_cases(tmp_path: Path) -> None:
    src = _dataset(tmp_path / "ds", n=5)
    _break_three(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = preprocess_dataset(src, tmp_path / "cache", workers=1, skip_bad=True, progress=False)
    assert any("skipping 3 bad case(s)" in str(w.message) for w in caught)
    plan = load_plan(out)
    assert [c["id"] for c in plan["cases"]] == ["case_003", "case_004"]
    assert len(plan["skipped"]) == 3


def test_multichannel_files_and_4d(tmp_path: Path) -> None:
    # nnU-Net style: dataset.json names the case; the channels are case_XXXX_0000 / _0001 files.
    src = tmp_path / "mc"
    _dataset(src, n=2, channels=("T1", "T2"))
    for i in range(2):
        image = src / "imagesTr" / f"case_{i:03d}.nii.gz"
        data = read_volume(image).data
        image.unlink()
        write_nifti(src / "imagesTr" / f"case_{i:03d}_0000.nii.gz", data, AFFINE)
        write_nifti(src / "imagesTr" / f"case_{i:03d}_0001.nii.gz", data * 2, AFFINE)
    out = preprocess_dataset(src, tmp_path / "c1", workers=1, progress=False)
    assert np.load(out / "cases" / "case_000_image.npy").shape[0] == 2
    # Decathlon style: one 4D file with the channels on the last axis.
    src4 = tmp_path / "four"
    _dataset(src4, n=2, channels=("FLAIR", "T1w"))
    for i in range(2):
        path = src4 / "imagesTr" / f"case_{i:03d}.nii.gz"
        data = read_volume(path).data
        write_nifti(path, np.stack([data, -data], axis=-1), AFFINE)
    out4 = preprocess_dataset(src4, tmp_path / "c2", workers=1, progress=False)
    image = np.load(out4 / "cases" / "case_001_image.npy")
    assert image.shape[0] == 2 and np.allclose(image[0], -image[1], atol=1e-5)  # z-score of -x is -z
    # A 4D file with the wrong channel count names the file and both numbers.
    path = src4 / "imagesTr" / "case_000.nii.gz"
    write_nifti(path, np.stack([data] * 3, axis=-1), AFFINE)
    name, msg = _only(_errors(src4, tmp_path))
    assert name == "case_000.nii.gz" and "2 channels" in msg and "(12, 10, 8, 3)" in msg


def test_plain_folder_of_unlabeled_volumes(tmp_path: Path) -> None:
    for i in range(3):
        write_nifti(tmp_path / "plain" / f"vol{i}.nii", _pair(i)[0], AFFINE)
    (tmp_path / "plain" / "notes.txt").write_text("ignored")
    plan = load_plan(preprocess_dataset(tmp_path / "plain", tmp_path / "cache", workers=1, progress=False))
    assert [(c["id"], c["has_label"]) for c in plan["cases"]] == [
        ("vol0", False),
        ("vol1", False),
        ("vol2", False),
    ]
