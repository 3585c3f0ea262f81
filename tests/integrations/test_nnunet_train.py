"""nnFormer inside nnU-Net v2, end to end with nnU-Net's own commands: ``nnUNetv2_plan_and_preprocess``
of a tiny phantom dataset, ``maeformer nnunet-init``, ``nnUNetv2_train`` finding the trainers through
``nnUNet_extTrainer=$(maeformer nnunet-trainers)`` and loading ``-pretrained_weights``, and
``nnUNetv2_predict``. On the CPU, with the 5-epoch trainers (50 steps of batch 2 at patch 16x20x20).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="these tests run nnU-Net v2 (pip install -e '.[nnunet]')")

from maeformer_fast.cli.main import main  # noqa: E402
from maeformer_fast.data import make_phantoms, read_volume  # noqa: E402
from maeformer_fast.integrations.nnunet.network import PLANS_KEY  # noqa: E402
from maeformer_fast.models.config import get_config  # noqa: E402
from maeformer_fast.models.nnformer import NNFormerEncoder  # noqa: E402
from maeformer_fast.models.official import SAFE_GLOBALS  # noqa: E402
from maeformer_fast.models.pretrained import ENCODER_FORMAT, read_encoder_file, save_encoder  # noqa: E402
from maeformer_fast.weights import save_weights  # noqa: E402

DATASET_ID = "991"
DATASET = "Dataset991_NNFormerPhantoms"
NUM_LABELED = 5  # nnU-Net's five folds: fold 0 trains on 4 and validates on 1
STUDY_ENCODER = (
    Path(__file__).resolve().parents[2]
    / "results/hippocampus_study_converged/records/pretrain/stages-3_mask-0.6_steps-20000/encoder.safetensors"
)
# Not the trainers' default (embedding 32): a network with these shapes proves the plans entry was read.
ENCODER_CONFIG = get_config("small", embed_dim=24, depths=(2, 2, 2), num_heads=(2, 4, 8),
                            window_sizes=((4, 4, 4),) * 3)  # fmt: skip


def run(env: dict[str, str], command: str, *args: str) -> subprocess.CompletedProcess:
    """Run a console script of this environment (nnUNetv2_*, maeformer); it must succeed."""
    script = Path(sys.executable).with_name(command)
    result = subprocess.run([str(script), *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def load_nnunet_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint, unpickling only tensors, containers and numpy scalars."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A raw nnU-Net dataset of 5 labeled phantoms (20x24x20 voxels, 3 classes) and 1 test image, after
    ``nnUNetv2_plan_and_preprocess -c 3d_fullres``; ``env`` runs nnU-Net's commands on it, with our
    trainers on ``nnUNet_extTrainer`` as ``maeformer nnunet-trainers`` prints it."""
    root = tmp_path_factory.mktemp("nnunet")
    phantoms = make_phantoms(root / "phantoms", num_labeled=NUM_LABELED, num_unlabeled=1, shape=(20, 24, 20))
    raw = root / "nnUNet_raw" / DATASET
    shutil.copytree(phantoms / "labelsTr", raw / "labelsTr")
    for images in ("imagesTr", "imagesTs"):
        (raw / images).mkdir()
        for image in (phantoms / images).iterdir():  # nnU-Net names channel files CASE_0000
            shutil.copy(image, raw / images / image.name.replace(".nii.gz", "_0000.nii.gz"))
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ1": 1, "organ2": 2},
            "numTraining": NUM_LABELED, "file_ending": ".nii.gz"}  # fmt: skip
    (raw / "dataset.json").write_text(json.dumps(meta))
    env = {name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    # One core's worth: no augmentation workers, one export/preprocessing worker (the default 8 are
    # spawned afresh for every validation and cost more than the tiny cases).
    # (Planning takes nnUNet_n_proc_DA as a thread count; training runs augmentation in-process at 0.)
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}
    run(env, "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1")
    env["nnUNet_n_proc_DA"] = "0"
    env["nnUNet_extTrainer"] = run(env, "maeformer", "nnunet-trainers").stdout.strip()
    dataset = root / "nnUNet_preprocessed" / DATASET
    plans = (dataset / "nnUNetPlans.json").read_text()
    return {"env": env, "raw": raw, "dataset": dataset, "plans": plans}


def use_nnunet_folders(nnunet: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture's nnU-Net folders for in-process commands (nnunetv2 reads them when asked)."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, nnunet["env"][name])


def plans_copy(nnunet: dict, name: str) -> str:
    """The plans as nnU-Net wrote them, as plans NAME (``-p``/``--plans``; results in
    ``TRAINER__NAME__3d_fullres``), so that a test's plans entry touches no other test's; the
    preprocessed data are shared (the configuration's data_identifier is unchanged)."""
    plans = json.loads(nnunet["plans"])
    plans["plans_name"] = name
    (nnunet["dataset"] / f"{name}.json").write_text(json.dumps(plans, indent=4))
    return name


@pytest.fixture(scope="module")
def mae_run(nnunet: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``maeformer nnunet-init`` of a freshly initialised encoder of :data:`ENCODER_CONFIG`, then
    ``nnUNetv2_train 991 3d_fullres 0 -tr nnUNetTrainer_nnFormerMAE_5epochs -pretrained_weights``."""
    work = tmp_path_factory.mktemp("mae")
    torch.manual_seed(1)
    encoder = save_encoder(work / "encoder.safetensors", NNFormerEncoder(ENCODER_CONFIG))
    init = work / "init.pth"
    plans = plans_copy(nnunet, "nnUNetPlansMAE")
    with pytest.MonkeyPatch.context() as monkeypatch:  # in-process: this interpreter has imported it all
        use_nnunet_folders(nnunet, monkeypatch)
        args = ["nnunet-init", str(encoder), "--dataset", DATASET_ID, "--plans", plans, "--out", str(init)]
        assert main(args) == 0
    env, trainer = nnunet["env"], "nnUNetTrainer_nnFormerMAE_5epochs"
    run(env, "nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", trainer, "-p", plans,
        "-pretrained_weights", str(init), "-device", "cpu")  # fmt: skip
    results = Path(env["nnUNet_results"]) / DATASET / f"{trainer}__{plans}__3d_fullres"
    return {"encoder": encoder, "init": init, "trainer": trainer, "plans": plans, "results": results,
            "work": work}  # fmt: skip


def test_mae_trainer_trains_from_the_encoder_exactly(mae_run: dict) -> None:
    """The network nnU-Net trained holds the pretrained encoder's tensors exactly: ``nnunet-init`` put
    them in the checkpoint, ``-pretrained_weights`` loaded them, and the 50 steps all fall in the
    recipe's 500 frozen steps; decoder and heads did train. The network has the encoder file's
    architecture (embedding 24, not the trainers' 32): the plans entry reached nnU-Net's build.

    Mutations seen failing: a key renamed in the hand-off (``encoder.stages.1.norm.`` written as
    ``encoder.stages.1.norms.`` into init.pth: nnU-Net refuses the checkpoint); the hand-off skipping
    ``load_encoder_tensors`` (a random encoder); ``freeze_encoder_steps`` 0 in the MAE recipe (the
    encoder moves)."""
    encoder, _, _ = read_encoder_file(mae_run["encoder"])
    init = torch.load(mae_run["init"], map_location="cpu", weights_only=True)["network_weights"]
    final = load_nnunet_checkpoint(mae_run["results"] / "fold_0" / "checkpoint_final.pth")
    weights = final["network_weights"]
    assert final["trainer_name"] == mae_run["trainer"] and set(weights) == set(init)
    for key, tensor in encoder.items():
        assert torch.equal(weights[f"encoder.{key}"], tensor), key
    assert weights["encoder.patch_embed.layers.3.conv.weight"].shape[0] == 24
    trained = [k for k in init if not k.startswith("encoder.") and not torch.equal(weights[k], init[k])]
    assert any(k.startswith("decoder.") for k in trained) and any(k.startswith("heads.") for k in trained)


def test_predict_writes_label_maps_in_the_input_geometry(nnunet: dict, mae_run: dict) -> None:
    """``nnUNetv2_predict`` with the trained fold writes a label map with the input's shape and affine
    and only the dataset's labels. Mutation seen failing: ``NNUNetNNFormer`` keeping deep
    supervision on when built for prediction (a list reaches nnU-Net's sliding window)."""
    out = mae_run["work"] / "predictions"
    run(nnunet["env"], "nnUNetv2_predict", "-i", str(nnunet["raw"] / "imagesTs"), "-o", str(out),
        "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0", "-tr", mae_run["trainer"], "-p", mae_run["plans"],
        "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar")  # fmt: skip
    image_file = next((nnunet["raw"] / "imagesTs").iterdir())
    image = read_volume(image_file)
    label = read_volume(out / image_file.name.replace("_0000.nii.gz", ".nii.gz"), kind="label")
    assert label.data.shape == image.data.shape == (20, 24, 20)
    np.testing.assert_allclose(label.affine, image.affine)
    assert set(np.unique(label.data)) <= {0, 1, 2}


def test_scratch_trainer_runs_with_its_default_nnformer(nnunet: dict) -> None:
    """``nnUNetTrainer_nnFormer_5epochs`` trains on plans without an entry: it builds the trainers'
    default nnFormer and warms up to the scratch recipe's lr 5e-3 (epoch E starts at step 10 E: lr
    5e-3 x (10 E + 1) / 1000, which nnU-Net logs rounded to 5 decimals), and its log says which recipe
    and what the 5-epoch class changed in it (the warmup a 50-step budget would get, 12, kept at 1000).
    Mutation seen failing: the scratch trainer with the MAE recipe's lr (3e-3)."""
    plans = plans_copy(nnunet, "nnUNetPlansScratch")
    trainer = "nnUNetTrainer_nnFormer_5epochs"
    run(
        nnunet["env"],
        "nnUNetv2_train",
        DATASET_ID,
        "3d_fullres",
        "0",
        "-tr",
        trainer,
        "-p",
        plans,
        "-device",
        "cpu",
    )
    fold = Path(nnunet["env"]["nnUNet_results"]) / DATASET / f"{trainer}__{plans}__3d_fullres" / "fold_0"
    weights = load_nnunet_checkpoint(fold / "checkpoint_final.pth")["network_weights"]
    assert weights["encoder.patch_embed.layers.3.conv.weight"].shape[0] == 32
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "nnFormer from the trainer's default" in log
    logged = [float(lr) for lr in re.findall(r"Current learning rate: ([0-9.e-]+)", log)]
    assert logged == pytest.approx([5e-3 * (10 * epoch + 1) / 1000 for epoch in range(5)], abs=5.1e-6)
    assert "recipe scratch (" in log and "set by the run instead: warmup_steps (recipe: 12)" in log


def test_study_encoder_hands_over(nnunet: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The converged study's 3-stage encoder fits the MAE trainer: its architecture is recorded in the
    plans and its tensors are in the checkpoint, which ``torch.load(weights_only=True)`` reads.
    Mutation seen failing: the plans entry not written (``atomic_write_text`` of the plans removed)."""
    if not STUDY_ENCODER.is_file():
        pytest.skip(f"{STUDY_ENCODER} is not in this checkout")
    use_nnunet_folders(nnunet, monkeypatch)
    plans = plans_copy(nnunet, "nnUNetPlansStudy")
    out = tmp_path / "init.pth"
    assert (
        main(["nnunet-init", str(STUDY_ENCODER), "--dataset", DATASET, "--plans", plans, "--out", str(out)])
        == 0
    )
    tensors, config, _ = read_encoder_file(STUDY_ENCODER)
    recorded = json.loads((nnunet["dataset"] / f"{plans}.json").read_text())["configurations"]["3d_fullres"]
    assert recorded[PLANS_KEY]["model_config"] == json.loads(json.dumps(config.to_dict()))
    assert config.depths == (2, 2, 2)
    saved = torch.load(out, weights_only=True)
    assert saved["maeformer"]["trainer"] == "nnUNetTrainer_nnFormerMAE"
    for key, tensor in tensors.items():
        assert torch.equal(saved["network_weights"][f"encoder.{key}"], tensor), key


def test_nnunet_init_names_what_does_not_fit(
    nnunet: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An encoder for two input channels, one with a renamed tensor, and a file that is not ours are
    refused with one line naming the channels, the keys, or ``--official``; nothing is written (no
    checkpoint, plans unchanged). Mutation seen failing: the encoder loaded with ``strict=False``
    instead of ``load_state_exact`` (the renamed tensor passes; the channel check still holds)."""
    use_nnunet_folders(nnunet, monkeypatch)
    plans = plans_copy(nnunet, "nnUNetPlansRefused")
    plans_file = nnunet["dataset"] / f"{plans}.json"
    written = plans_file.read_text()
    out = tmp_path / "init.pth"

    def init(path: Path) -> str:
        args = ["nnunet-init", str(path), "--dataset", DATASET_ID, "--plans", plans, "--out", str(out)]
        assert main(args) == 2
        return capsys.readouterr().err

    two_channels = save_encoder(
        tmp_path / "two.safetensors", NNFormerEncoder(get_config("small", in_channels=2))
    )
    message = init(two_channels)
    assert "takes 2 input channel(s)" in message and "gets 1" in message

    state = NNFormerEncoder(ENCODER_CONFIG).state_dict()
    state["stages.1.norms.weight"] = state.pop("stages.1.norm.weight")
    renamed = tmp_path / "renamed.safetensors"
    save_weights(renamed, state, {"format": ENCODER_FORMAT, "model_config": ENCODER_CONFIG.to_dict()})
    message = init(renamed)
    assert "missing: encoder.stages.1.norm.weight" in message
    assert "unexpected: encoder.stages.1.norms.weight" in message

    official = tmp_path / "official.model"
    torch.save({"state_dict": {"model_down.patch_embed.norm.weight": torch.ones(3)}}, official)
    assert "--official synapse|acdc|tumor" in init(official)
    assert not out.exists() and plans_file.read_text() == written


def test_budget_trainers_set_their_length_on_the_instance(
    nnunet: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``_500it`` trainers, nnU-Net's CNN among them, built by nnU-Net's own ``__init__`` on real
    plans: 20 epochs of 25 iterations (500 steps), 5 validation iterations, a checkpoint every epoch
    (nnU-Net: 1000 x 250, 50, every 50); the nnFormer ones keep their recipe's name. Mutation seen
    failing: ``BudgetedTrainer`` not setting ``save_every`` (nnU-Net's 50)."""
    use_nnunet_folders(nnunet, monkeypatch)
    from maeformer_fast.integrations.nnunet.trainers import maeformer_nnformer as module

    plans = json.loads(nnunet["plans"])
    dataset_json = json.loads((nnunet["dataset"] / "dataset.json").read_text())
    for name in ("nnUNetTrainer_500it", "nnUNetTrainer_nnFormer_500it", "nnUNetTrainer_nnFormerMAE_500it"):
        # nnU-Net's run_training adds (and the trainer pops) "continue_training"
        run_plans = {**plans, "continue_training": False}
        trainer = getattr(module, name)(run_plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
        budget = (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch)
        assert budget == (20, 25, 5) and trainer.save_every == 1, name
    assert module.nnUNetTrainer_nnFormerMAE_500it.recipe == "mae"


def test_cpu_trainers_keep_omp_num_threads(nnunet: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """``nnUNetv2_train -device cpu`` sets torch to every core before it builds the trainer; with
    ``OMP_NUM_THREADS=1`` the trainers (nnU-Net's CNN among them) set it back to 1, so runs side by side
    on one machine get a core each. Mutation seen failing: the ``torch.set_num_threads`` in
    ``BudgetedTrainer.__init__`` removed."""
    use_nnunet_folders(nnunet, monkeypatch)
    from maeformer_fast.integrations.nnunet.trainers import maeformer_nnformer as module

    plans = {**json.loads(nnunet["plans"]), "continue_training": False}
    dataset_json = json.loads((nnunet["dataset"] / "dataset.json").read_text())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        for name in ("nnUNetTrainer_500it", "nnUNetTrainer_nnFormer_500it"):
            torch.set_num_threads(2)  # what nnUNetv2_train does on a 2-core machine
            getattr(module, name)(dict(plans), "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
            assert torch.get_num_threads() == 1, name
    finally:
        torch.set_num_threads(before)
