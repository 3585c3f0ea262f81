"""Fine-tuning, sliding-window inference, prediction geometry, metrics and encoder loading rules."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maeformer_fast.data import DatasetError
from maeformer_fast.inference.metrics import dice, hd95
from maeformer_fast.inference.predict import evaluate, predict
from maeformer_fast.inference.sliding_window import sliding_window_predict
from maeformer_fast.models import NNFormer, NNFormerEncoder, get_config
from maeformer_fast.models.pretrained import init_from_encoder, load_encoder, save_encoder
from maeformer_fast.train.finetune import FinetuneConfig, finetune
from maeformer_fast.weights import save_weights

HIPPOCAMPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "Task04_Hippocampus"


@pytest.mark.parametrize(
    ("schedule", "optimizer", "warmup", "expected"),
    [  # lr of steps 0..7 of 8, peak 1e-3 (adamw) or 1e-2 (sgd)
        ("constant", "adamw", 2, [0.5e-3] + [1e-3] * 7),
        ("constant", "sgd", 2, [0.5e-2] + [1e-2] * 7),
        ("constant", "adamw", 0, [1e-3] * 8),  # no warmup: the peak from the first step
        # cosine from step 2: progress (s - 2) / 6, factor (1 + cos(pi * progress)) / 2
        ("decay", "adamw", 2, [0.5e-3, 1e-3, 1e-3, 0.933e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.067e-3]),
        ("decay", "sgd", 2, [1e-2 * (1 - s / 8) ** 0.9 for s in range(8)]),  # poly 0.9, no warmup
    ],
)
def test_lr_schedules_by_hand(schedule, optimizer, warmup, expected):
    """The schedules a fine-tuning run can use, step by step. Mutations caught: "constant" falling
    through to the optimizer's decay (its rows get the cosine / poly values); a constant warmup that
    divides by a zero warmup (ZeroDivisionError)."""
    from maeformer_fast.train.finetune import build_optimisation

    model = NNFormer(get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2)))
    config = FinetuneConfig(
        data="",
        out="",
        recipe="none",
        steps=8,
        warmup_steps=warmup,
        optimizer=optimizer,
        lr_schedule=schedule,
    )
    optimisation = build_optimisation(config, model, "fp32", torch.device("cpu"))
    lrs = []
    for _ in range(8):
        lrs.append(optimisation.lr)
        optimisation.scheduler.step()
    assert lrs == pytest.approx(expected, abs=1e-6)


def test_unknown_lr_schedule_is_refused():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        FinetuneConfig(data="", out="", lr_schedule="cosine")


def test_encoder_file_round_trip_and_exact_key_check(tmp_path):
    config = get_config("small", embed_dim=16, num_heads=(1, 2, 2, 4))
    encoder = NNFormerEncoder(config)
    path = save_encoder(tmp_path / "encoder.safetensors", encoder)
    loaded = load_encoder(path)
    for name, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    model = NNFormer(config)
    init_from_encoder(model, path)  # decoder and heads may be missing: fine
    assert torch.equal(model.encoder.stages[0].norm.weight, encoder.stages[0].norm.weight)

    broken = dict(encoder.state_dict())
    broken.pop("stages.1.norm.weight")
    broken["stages.1.extra"] = torch.zeros(1)
    meta = {"format": "maeformer-encoder-v1", "model_config": config.to_dict(), "info": {}}
    save_weights(tmp_path / "broken.safetensors", broken, meta)
    with pytest.raises(
        ValueError, match="missing: encoder.stages.1.norm.weight.*unexpected: encoder.stages.1.extra"
    ):
        init_from_encoder(NNFormer(config), tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="weights do not fit"):
        init_from_encoder(NNFormer(get_config("small")), path)  # other widths: shape mismatch
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_encoder(tmp_path / "junk.safetensors")


def test_sliding_window_equals_direct_inference_when_the_window_covers_the_volume():
    torch.manual_seed(0)
    model = NNFormer(get_config("small", embed_dim=16, num_heads=(1, 2, 2, 4))).eval()
    image = torch.randn(1, 32, 48, 32)
    with torch.no_grad():
        direct = model(image[None]).softmax(1)[0]
    windowed = sliding_window_predict(model, image, (32, 48, 32), num_classes=3)
    torch.testing.assert_close(windowed, direct, atol=1e-5, rtol=1e-5)
    smaller = sliding_window_predict(model, image[:, :20, :30, :17], (32, 48, 32), num_classes=3)
    assert smaller.shape == (3, 20, 30, 17)  # padded to the window, cropped back
    for overlap in (-1.0, 1.0):  # windows that would leave gaps, or never advance
        with pytest.raises(ValueError, match="overlap must lie in"):
            sliding_window_predict(model, image, (16, 16, 16), num_classes=3, overlap=overlap)


def test_dice_and_hd95_on_hand_built_cases():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[2:4, 2:4, 2:4] = True  # 8 voxels
    b[2:4, 2:4, 2:6] = True  # 16 voxels, 8 shared
    assert dice(a, b) == pytest.approx(2 * 8 / 24)
    assert dice(a, a) == 1.0 and hd95(a, a, (1, 1, 1)) == 0.0
    shifted = np.roll(a, 3, axis=0)
    assert dice(a, shifted) == 0.0
    assert hd95(a, shifted, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(a, shifted, (2.0, 1.0, 1.0)) == pytest.approx(6.0)  # spacing-aware
    empty = np.zeros_like(a)
    assert dice(empty, empty) == 1.0 and hd95(empty, empty, (1, 1, 1)) == 0.0
    assert dice(a, empty) == 0.0 and math.isnan(hd95(a, empty, (1, 1, 1)))


def test_short_finetune_reaches_non_trivial_dice_and_predicts_in_source_geometry(phantom_dataset, tmp_path):
    config = FinetuneConfig(data=str(phantom_dataset), out=str(tmp_path / "ft"), steps=120, val_every=60,
                            num_workers=0, progress=False, max_val_cases=2, evaluate_test=False,
                            recipe="none")  # fmt: skip
    result = finetune(config)
    # Measured mean foreground Dice after 120 steps (seed 0): 0.181 on torch 2.13, 0.108 on torch 2.11
    # (other arithmetic, same random draws); seeds 1-3 gave 0.088-0.316. The untrained model (lr 1e-12)
    # scores 0.028 (torch 2.11) and 0.049 (2.13) at seed 0, 0.033-0.063 at seeds 1-3: the bound sits
    # between the two, about 1.45x from the nearest seed-0 value on either side.
    assert result.best_val_dice > 0.075, result.curve
    assert [step for step, _ in result.curve] == [60, 120]

    import nibabel as nib

    dataset = Path(phantom_dataset)
    inputs, refs = tmp_path / "in", tmp_path / "ref"
    inputs.mkdir()
    refs.mkdir()
    for case in result.splits["test"][:2]:
        shutil.copy(dataset / "imagesTr" / f"{case}.nii.gz", inputs)
        shutil.copy(dataset / "labelsTr" / f"{case}.nii.gz", refs)
    written = predict(result.out, inputs, tmp_path / "pred")  # the run folder: its best model
    for path in written:
        source = nib.load(str(inputs / path.name))
        predicted = nib.load(str(path))
        assert predicted.shape == source.shape
        np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-5)
        assert np.asarray(predicted.dataobj).dtype == np.uint8
    scores = evaluate(tmp_path / "pred", refs)
    assert set(scores["summary"]) == {"1", "2"}
    assert (tmp_path / "pred" / "scores.csv").is_file()

    (inputs / "aaa_broken.nii.gz").write_bytes(b"not a NIfTI file")  # sorts first
    with pytest.raises(DatasetError) as caught:
        predict(result.out, inputs, tmp_path / "pred_again")
    assert "its 2 readable inputs" in str(caught.value) and "aaa_broken.nii.gz" in str(caught.value)
    again = sorted(p.name for p in (tmp_path / "pred_again").glob("*.nii.gz"))
    assert again == sorted(p.name for p in written)


def test_evaluate_files_with_known_answers_counts_false_positive_classes(tmp_path, capsys):
    from maeformer_fast.cli.main import main
    from maeformer_fast.data import write_nifti

    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    ref_a, pred_a = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    ref_a[2:4, 2:4, 2:4] = pred_a[2:4, 2:4, 2:4] = 1
    pred_a[6, 6, 6] = 2  # class 2 predicted where the reference has none
    ref_b, pred_b = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    ref_b[1:3, 1:3, 1:3] = pred_b[1:3, 1:3, 1:3] = 1
    ref_b[5:7, 5:7, 5:7] = 2
    pred_b[5:7, 5:7, 5:6] = 2  # half of the reference: Dice 2 * 4 / (8 + 4)
    for name, ref, pred in (("a", ref_a, pred_a), ("b", ref_b, pred_b)):
        write_nifti(tmp_path / "ref" / f"{name}.nii.gz", ref, affine)
        write_nifti(tmp_path / "pred" / f"{name}.nii.gz", pred, affine)

    summary = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "scores")["summary"]
    assert summary["1"]["dice"] == {"mean": 1.0, "std": 0.0, "count": 2}
    assert summary["1"]["hd95"]["mean"] == 0.0
    assert summary["2"]["dice"]["mean"] == pytest.approx(1 / 3)
    assert summary["2"]["dice"]["std"] == pytest.approx(1 / 3)
    assert summary["2"]["hd95"]["count"] == 1  # undefined for the false positive: one mask empty
    rows = (tmp_path / "scores" / "scores.csv").read_text().splitlines()
    assert rows[0] == "case,class,dice,hd95" and len(rows) == 5

    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "only1"), "--classes", "1"]) == 0  # fmt: skip
    assert list(json.loads((tmp_path / "only1" / "scores.json").read_text())["summary"]) == ["1"]
    assert main(["predict", "--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "no_model" in capsys.readouterr().err
    write_nifti(tmp_path / "pred" / "b.nii.gz", pred_b[:7], affine)  # one slice short
    with pytest.raises(ValueError, match=r"pred/b.nii.gz: shape \(7, 8, 8\) differs from the reference"):
        evaluate(tmp_path / "pred", tmp_path / "ref")


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="the shared hippocampus data is not beside the checkout")
def test_predict_round_trips_geometry_of_real_hippocampus_files(tmp_path):
    import nibabel as nib

    from maeformer_fast.data import ensure_preprocessed, load_plan
    from maeformer_fast.models.pretrained import save_segmenter

    cases = sorted((HIPPOCAMPUS / "imagesTr").glob("hippocampus_*.nii.gz"))[:3]
    source = tmp_path / "Task04_Hippocampus"
    for folder in ("imagesTr", "labelsTr"):
        (source / folder).mkdir(parents=True)
    for case in cases:
        shutil.copy(case, source / "imagesTr")
        shutil.copy(HIPPOCAMPUS / "labelsTr" / case.name, source / "labelsTr")
    entries = [{"image": f"./imagesTr/{c.name}", "label": f"./labelsTr/{c.name}"} for c in cases]
    import json

    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    (source / "dataset.json").write_text(
        json.dumps({**meta, "training": entries, "test": [], "numTraining": 3})
    )
    plan = load_plan(ensure_preprocessed(source, tmp_path / "cache"))
    model = NNFormer(get_config("small", embed_dim=16, num_heads=(1, 2, 2, 4), num_classes=3))
    path = save_segmenter(tmp_path / "model.safetensors", model, plan, {})
    written = predict(path, source / "imagesTr", tmp_path / "pred")
    assert len(written) == 3
    for out in written:
        original = nib.load(str(source / "imagesTr" / out.name))
        predicted = nib.load(str(out))
        assert predicted.shape == original.shape
        np.testing.assert_allclose(predicted.affine, original.affine, atol=1e-5)


def test_demo_never_deletes_runs_it_did_not_make(tmp_path, capsys):
    from maeformer_fast.cli.main import main

    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "encoder.safetensors").write_bytes(b"a user's run")
    assert main(["demo", "--out", str(tmp_path), "--pretrain-steps", "1", "--finetune-steps", "1"]) == 2
    assert "not made by the demo" in capsys.readouterr().err
    assert (tmp_path / "pretrain" / "encoder.safetensors").read_bytes() == b"a user's run"


def test_killed_finetuning_resumes_to_the_same_weights(phantom_cache, tmp_path):
    """SIGKILL after a checkpoint, then ``--resume``: with ``--deterministic`` the weights, losses and
    validation curve equal an uninterrupted run's bit for bit. Catches a resumed loader that starts
    over (tried: ``start_step=0`` in ``finetune``), and a schedule that restarts (tried: the scheduler
    state not loaded in ``Optimisation.resume``)."""
    import csv
    import os
    import signal
    import subprocess
    import sys
    import time

    from maeformer_fast.weights import load_weights

    steps = 6
    common = dict(steps=steps, batch_size=2, num_workers=0, progress=False, checkpoint_every=2, val_every=3,
                  max_val_cases=1, evaluate_test=False, deterministic=True)  # fmt: skip
    straight = finetune(FinetuneConfig(data=str(phantom_cache), out=str(tmp_path / "straight"), **common))

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "maeformer_fast.cli", "finetune", "--data", str(phantom_cache),
               "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--num-workers", "0",
               "--checkpoint-every", "2", "--val-every", "3", "--max-val-cases", "1", "--no-evaluate-test",
               "--no-progress", "--deterministic"]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    latest, deadline = out / "checkpoints" / "latest", time.time() + 120
    while not latest.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "last.safetensors").exists(), "the run finished before it could be killed"

    resumed = finetune(FinetuneConfig(data=str(phantom_cache), out=str(out), resume=True, **common))
    assert resumed.curve == straight.curve and resumed.best_step == straight.best_step
    for name in ("last.safetensors", "model.safetensors"):
        expected, _ = load_weights(straight.out / name)
        for key, value in load_weights(out / name)[0].items():
            assert torch.equal(value, expected[key]), f"{name} {key}"

    def losses(run: Path) -> list[tuple[str, str]]:
        return [(r["step"], r["loss"]) for r in csv.DictReader((run / "finetune_log.csv").open())]

    assert losses(out) == losses(straight.out) and len(losses(out)) == steps


def test_paused_finetuning_stops_at_a_checkpoint_and_resumes_to_the_same_run(phantom_cache, tmp_path):
    """``pause`` (the study's ``--max-hours``) ends a run at a checkpoint before its last step, unscored,
    and the resumed run equals an uninterrupted one (curve, best step, weights). Pause is asked after
    each checkpoint that is not the last step: at step 2, at step 4 (after the validation at step 3),
    never at step 6. Mutations caught: the pause check removed (the first run finishes); pause asked at
    the last step too (the third call pauses at step 6)."""
    from maeformer_fast.weights import load_weights

    common = dict(data=str(phantom_cache), steps=6, batch_size=2, num_workers=0, progress=False,
                  checkpoint_every=2, val_every=3, max_val_cases=1, deterministic=True)  # fmt: skip
    straight = finetune(FinetuneConfig(out=str(tmp_path / "straight"), **common))
    paused = FinetuneConfig(out=str(tmp_path / "paused"), resume=True, **common)
    first = finetune(paused, pause=lambda: True)
    assert first.paused and first.curve == [] and first.test_dice is None
    assert not (tmp_path / "paused" / "last.safetensors").exists()
    second = finetune(paused, pause=lambda: True)
    assert second.paused and second.curve == straight.curve[:1]
    third = finetune(paused, pause=lambda: True)
    assert not third.paused and third.curve == straight.curve and third.best_step == straight.best_step
    assert third.test_dice == straight.test_dice
    for name in ("last.safetensors", "model.safetensors"):
        expected, _ = load_weights(straight.out / name)
        for key, value in load_weights(third.out / name)[0].items():
            assert torch.equal(value, expected[key]), f"{name} {key}"


def test_a_checkpoint_from_before_lr_schedule_resumes_only_with_the_decay(phantom_cache, tmp_path):
    """A checkpoint written before ``lr_schedule`` existed trained with the decay: resuming it as a
    "constant" run is refused like any other changed setting, and as "decay" it resumes. Mutation
    caught: no ``ADDED_FIELDS`` default (the "constant" resume goes through silently)."""
    tiny = {"embed_dim": 8, "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)}
    common = dict(data=str(phantom_cache), out=str(tmp_path / "run"), steps=2, batch_size=2, num_workers=0,
                  progress=False, checkpoint_every=1, val_every=1, max_val_cases=1, evaluate_test=False,
                  labeled=2, val_fraction=0.1, test_fraction=0.1, model_overrides=tiny,
                  recipe="none")  # fmt: skip
    finetune(FinetuneConfig(**{**common, "steps": 1}))
    meta_path = next((tmp_path / "run" / "checkpoints").glob("step-*")) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["lr_schedule"]  # as a checkpoint of the earlier code has it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lr_schedule 'decay' -> 'constant'"):
        finetune(FinetuneConfig(**common, resume=True, lr_schedule="constant"))
    assert finetune(FinetuneConfig(**common, resume=True)).curve[-1][0] == 2
