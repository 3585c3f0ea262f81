"""Pretraining on nnU-Net v2 data: a raw ``DatasetXXX_Name`` folder, and a preprocessed configuration
folder whose voxels reach the encoder exactly as nnU-Net wrote them.

The preprocessed tests run the real ``nnUNetv2_plan_and_preprocess`` on a tiny phantom dataset once per
module (about 30 s on one core) and skip without nnunetv2; the raw-folder tests need no nnunetv2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maeformer_fast.cli.main import main
from maeformer_fast.data import make_loader, make_phantoms, read_volume, write_nifti
from maeformer_fast.data.cache import cached_array, load_plan
from maeformer_fast.data.loaders import make_sampler
from maeformer_fast.data.sampling import read_crop
from maeformer_fast.integrations.nnunet.preprocessed import convert_preprocessed, read_configuration
from maeformer_fast.models.pretrained import load_encoder

DATASET = "Dataset990_Phantoms"
Z_SPACINGS = (1.0, 1.5, 2.0, 1.5)  # one per labeled case: nnU-Net resamples to the median, 1.5 mm
PRETRAIN = [
    "--steps",
    "3",
    "--batch-size",
    "2",
    "--num-workers",
    "0",
    "--no-progress",
    "--checkpoint-every",
    "3",
]


def write_nnunet_raw(folder: Path, channels: list[str], work: Path, ending: str = ".nii.gz") -> Path:
    """An nnU-Net v2 raw dataset from phantoms: ``case_XXXX`` channel files (channel c = image * (c + 1)),
    labels, two unlabeled images in imagesTs, dataset.json with channel_names/labels/file_ending."""
    phantoms = make_phantoms(
        work / "phantoms", num_labeled=len(Z_SPACINGS), num_unlabeled=2, shape=(24, 32, 32)
    )
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, image_file in enumerate(
        sorted((phantoms / "imagesTr").iterdir()) + sorted((phantoms / "imagesTs").iterdir())
    ):
        case = image_file.name.removesuffix(".nii.gz")
        affine = np.diag([1.0, 1.0, Z_SPACINGS[i % len(Z_SPACINGS)], 1.0])  # NIfTI (x, y, z)
        images = "imagesTr" if image_file.parent.name == "imagesTr" else "imagesTs"
        data = read_volume(image_file).data
        for c in range(len(channels)):
            write_nifti(folder / images / f"{case}_{c:04d}{ending}", data * (c + 1), affine)
        if images == "imagesTr":
            label = read_volume(phantoms / "labelsTr" / image_file.name, kind="label").data.astype(np.uint8)
            write_nifti(folder / "labelsTr" / f"{case}{ending}", label, affine)
    meta = {
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": {"background": 0, "organ1": 1, "organ2": 2},
        "numTraining": len(Z_SPACINGS),
        "file_ending": ending,
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """nnU-Net's folders after ``nnUNetv2_plan_and_preprocess -d 990 -c 3d_fullres`` of a phantom dataset."""
    pytest.importorskip(
        "nnunetv2", reason="the preprocessed-folder tests run nnU-Net v2 (pip install nnunetv2)"
    )
    root = tmp_path_factory.mktemp("nnunet")
    env = {name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw = write_nnunet_raw(root / "nnUNet_raw" / DATASET, ["MRI"], root)
    tool = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    command = [str(tool), "-d", "990", "-c", "3d_fullres", "-np", "1", "-npfp", "1"]
    subprocess.run(
        command, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True
    )
    dataset = root / "nnUNet_preprocessed" / DATASET
    return {"raw": raw, "dataset": dataset, "config": dataset / "nnUNetPlans_3d_fullres", **env}


def nnunet_arrays(config: Path) -> dict[str, np.ndarray]:
    """Every case image nnU-Net wrote, read with blosc2 itself (not through the code under test)."""
    import blosc2

    files = sorted(p for p in config.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    return {p.name.removesuffix(".b2nd"): blosc2.open(str(p), mode="r")[:] for p in files}


def test_pretrain_sees_nnunet_voxels(
    nnunet: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``pretrain --data <configuration folder>`` runs on nnU-Net's arrays unchanged: the cache holds
    them bit for bit, the loaders cut their crops from exactly those values, the plan records the
    configuration's spacing, and the default crop is the plans' patch rounded up to the mask unit of
    the encoder given (the 3-stage one: 8 voxels; the study's 32x48x32 crop holds 96 of its units).
    Mutations seen failing: the image z-scored again in the conversion; the plans' spacing recorded in
    reverse axis order; the crop rounded down; the image cached transposed to (C, X, Y, Z); the crop
    rounded to the 4-stage config's unit (16) in spite of --model-overrides."""
    config = nnunet["config"]
    three_stages = json.dumps({"depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_sizes": [[4, 4, 4]] * 3})
    command = ["pretrain", "--data", str(config), "--out", str(tmp_path / "pre"), *PRETRAIN]
    assert main([*command, "--model-overrides", three_stages]) == 0
    assert (tmp_path / "pre" / "encoder.safetensors").is_file()
    assert "rounded up to the mask unit" in capsys.readouterr().err

    plans = json.loads((nnunet["dataset"] / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    crop = [math.ceil(p / 8) * 8 for p in plans["patch_size"]]
    assert crop != [math.ceil(p / 16) * 16 for p in plans["patch_size"]]  # the test tells the units apart
    assert json.loads((tmp_path / "pre" / "pretrain_config.json").read_text())["crop_size"] == crop
    cache = config.parent / f"{config.name}_maeformer_cache"
    plan = load_plan(cache)
    assert plan["spacing"] == plans["spacing"] == [1.5, 1.0, 1.0]
    assert plan["nnunet"]["patch_size"] == plans["patch_size"]

    arrays = nnunet_arrays(config)
    assert [c["id"] for c in plan["cases"]] == sorted(arrays) and len(arrays) == len(Z_SPACINGS)
    for case, array in arrays.items():
        ours = np.asarray(cached_array(cache, case, "image"))
        assert ours.dtype == array.dtype == np.float32 and np.array_equal(ours, array), case
    for placement in ("off", "on"):  # streamed (torch workers) and resident, the CPU default
        loader = make_loader(
            cache, crop, 4, labeled=False, augment=False, num_workers=0, data_on_device=placement
        )
        batch = next(loader)
        sampler = make_sampler(cache, crop, 4, labeled=False, augment=False)
        step = sampler.plan(0)
        for i, (case, start) in enumerate(zip(step.cases, step.starts)):
            expected = read_crop(arrays[sampler.case_ids[case]], start, tuple(crop))
            assert torch.equal(batch["image"][i], torch.from_numpy(expected)), (placement, i)


def test_conversion_skips_done_work_and_rebuilds_damage(
    nnunet: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A rerun rewrites nothing; a truncated array is rebuilt from nnU-Net's file and named on stderr.
    Mutation seen failing: the up-to-date check dropped (every case rewritten on each run)."""
    cache = convert_preprocessed(nnunet["config"], tmp_path / "cache", progress=False)
    arrays = sorted((cache / "cases").glob("*_image.npy"))
    stamps = [p.stat().st_mtime_ns for p in arrays]
    convert_preprocessed(nnunet["config"], cache, progress=False)
    assert [p.stat().st_mtime_ns for p in arrays] == stamps
    arrays[0].write_bytes(arrays[0].read_bytes()[:200])
    convert_preprocessed(nnunet["config"], cache, progress=False)
    assert "damaged cache file" in capsys.readouterr().err
    case = arrays[0].name.removesuffix("_image.npy")
    assert np.array_equal(cached_array(cache, case, "image"), nnunet_arrays(nnunet["config"])[case])


def test_preprocess_command_converts_a_configuration_folder(
    nnunet: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``maeformer preprocess <configuration folder> OUT`` builds the cache ahead of time (e.g. at one
    path for every node) and refuses options nnU-Net's plans decide. Mutation seen failing: the
    --spacing check removed (the option then silently ignored)."""
    assert main(["preprocess", str(nnunet["config"]), str(tmp_path / "cache"), "--spacing", "1,1,1"]) == 2
    assert "drop --spacing" in capsys.readouterr().err
    assert main(["preprocess", str(nnunet["config"]), str(tmp_path / "cache")]) == 0
    assert load_plan(tmp_path / "cache")["source"] == str(nnunet["config"].resolve())


def test_wrong_nnunet_folders_are_named(
    nnunet: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The dataset folder instead of a configuration folder, and a 2d configuration folder, end with one
    line naming the folder and the configuration folders to pass. Mutations seen failing: the dataset
    folder check removed (the raw-layout scan's "no cases" instead); 2d configurations accepted."""
    assert main(["pretrain", "--data", str(nnunet["dataset"]), "--out", str(tmp_path / "a"), *PRETRAIN]) == 2
    error = capsys.readouterr().err
    assert "preprocessed dataset folder" in error and str(nnunet["config"]) in error

    dataset = shutil.copytree(nnunet["dataset"], tmp_path / DATASET, ignore=shutil.ignore_patterns("*_cache"))
    flat = dataset / "nnUNetPlans_2d"  # as nnUNetv2_preprocess -c 2d would name it
    shutil.copytree(dataset / "nnUNetPlans_3d_fullres", flat)
    with pytest.raises(ValueError, match=r"configuration 2d is 2d.*nnUNetPlans_3d_fullres"):
        read_configuration(flat)


def test_pretrain_on_raw_folder_leaves_nnunet_ids_alone(
    nnunet: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pretrain --data $nnUNet_raw/DatasetXXX_Name`` runs, and its cache does not make nnU-Net see the
    id twice. Mutation seen failing: the cache named ``<name>_maeformer_cache`` (nnU-Net: "More than
    one dataset name found for dataset id 990")."""
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    assert main(["pretrain", "--data", str(nnunet["raw"]), "--out", str(tmp_path / "pre"), "--crop-size",
                 "16", "32", "32", *PRETRAIN]) == 0  # fmt: skip
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(nnunet[name]))
    assert convert_id_to_dataset_name(990) == DATASET
    assert load_plan(nnunet["raw"].parent / f"maeformer_cache_{DATASET}")["channel_names"] == ["MRI"]


def test_nnunet_trainer_trains_fold_zero_of_nnunet_split(
    nnunet: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nnU-Net's own trainer reads the file ``nnunet-split --dataset 990`` writes: fold 0 trains on the
    labeled case and validates on the fixed set. Mutation seen failing: the folds written as one dict
    instead of a list of folds (nnU-Net then reads ``splits[0]`` as a key)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(nnunet[name]))
    assert main(["nnunet-split", "--dataset", "990", "--labeled", "1", "--seed", "3"]) == 0
    record = json.loads((nnunet["dataset"] / "splits_final.maeformer.json").read_text())
    trainer = get_trainer_from_args("990", "3d_fullres", 0, device=torch.device("cpu"))
    assert trainer.do_split() == (record["train"], record["val"])
    assert len(record["train"]) == 1 and record["test"] and not set(record["test"]) & set(record["val"])


def test_raw_folder_channel_names_give_the_encoder_its_channels(tmp_path: Path) -> None:
    """A two-channel raw folder (``_0000``/``_0001`` files, ``channel_names``) pretrains an encoder with
    two input channels. Mutation seen failing: pretrain building the model config's one channel."""
    raw = write_nnunet_raw(tmp_path / "Dataset991_Two", ["T2", "ADC"], tmp_path)
    out = tmp_path / "pre"
    assert (
        main(["pretrain", "--data", str(raw), "--out", str(out), "--crop-size", "16", "32", "32", *PRETRAIN])
        == 0
    )
    plan = load_plan(tmp_path / "maeformer_cache_Dataset991_Two")
    assert (plan["channel_names"], plan["num_channels"]) == (["T2", "ADC"], 2)
    assert load_encoder(out / "encoder.safetensors").config.in_channels == 2


def test_non_nifti_file_ending_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An nnU-Net dataset of .mha files ends with one line naming dataset.json, the ending and the way
    through nnU-Net's preprocessing. Mutation seen failing: the file_ending check removed (the scan then
    reports an empty folder)."""
    raw = tmp_path / "Dataset992_Mha"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "imagesTr" / "a_0000.mha").write_bytes(b"")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".mha"}))
    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "pre")]) == 2
    error = capsys.readouterr().err
    assert (
        str(raw / "dataset.json") in error and "'.mha'" in error and "nnUNetv2_plan_and_preprocess" in error
    )
