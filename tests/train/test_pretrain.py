"""MAE pretraining: the masked-unit loss falls, and a SIGKILLed run resumes to the same weights."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maeformer_fast.data import make_loader
from maeformer_fast.data.cache import load_plan
from maeformer_fast.models.mae import MaskedAutoencoder
from maeformer_fast.models.pretrained import load_encoder
from maeformer_fast.ops.masking import random_unit_mask
from maeformer_fast.train.pretrain import PretrainConfig, build_mae, pretrain
from maeformer_fast.weights import load_weights


def config(cache, out, **overrides):
    values = dict(data=str(cache), out=str(out), steps=40, batch_size=2, num_workers=0, progress=False,
                  checkpoint_every=1000, preview_every=1000, log_every=5, seed=0,
                  deterministic=True)  # fmt: skip
    return PretrainConfig(**{**values, **overrides})


def trained_mae(settings: PretrainConfig) -> MaskedAutoencoder:
    """The whole MAE (encoder and decoder) of a finished run, from its last checkpoint, in eval mode."""
    model = build_mae(settings)
    weights, _ = load_weights(
        Path(settings.out) / "checkpoints" / f"step-{settings.steps:07d}" / "model.safetensors"
    )
    model.load_state_dict(weights)
    return model.eval()


@torch.no_grad()
def masked_unit_losses(model: MaskedAutoencoder, cache) -> tuple[float, float]:
    """(loss with the encoder's features, loss of the same decoder fed zeros instead) on 8 crops the
    run never drew (another seed, no augmentation), all with one mask."""
    crop = model.config.crop_size
    images = next(make_loader(cache, crop, 8, labeled=False, seed=123, num_workers=0, augment=False))["image"]
    unit_grid = model.encoder.unit_grid(crop)
    visible_ids = random_unit_mask(1, unit_grid, 0.75, torch.Generator().manual_seed(5)).expand(8, -1)
    features = model.forward_encoder(images, visible_ids)

    def loss(given: torch.Tensor) -> float:
        prediction = model.forward_decoder(given, visible_ids, unit_grid)
        return model.forward_loss(images, prediction, visible_ids).item()

    return loss(features), loss(torch.zeros_like(features))


def test_pretraining_reduces_masked_unit_loss_and_writes_outputs(phantom_cache, tmp_path):
    """The encoder must carry the reconstruction: catches a dead encoder (tried: its output times 0
    in ``MaskedAutoencoder.forward_encoder``; the loss still fell below 0.93 of its start, from the
    decoder's position embeddings, but its features then did no better than zeros). Measured: the
    trained features' loss is 0.88 of the zeroed ones'. Also catches an encoder file that is not
    the trained encoder (tried: ``save_encoder`` of a freshly built MAE's encoder)."""
    settings = config(phantom_cache, tmp_path / "run")
    result = pretrain(settings)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.93 * first, (first, last)
    model = trained_mae(settings)
    with_features, with_zeros = masked_unit_losses(model, phantom_cache)
    assert with_features < 0.95 * with_zeros, (with_features, with_zeros)
    saved = load_encoder(result.encoder_path).state_dict()
    assert saved.keys() == model.encoder.state_dict().keys()
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert (tmp_path / "run" / "previews" / "step-0000040.png").is_file()
    assert len(list((tmp_path / "run" / "pretrain_log.csv").read_text().splitlines())) == 1 + 40 // 5


def test_dense_simmim_baseline_learns(phantom_cache, tmp_path):
    """As the sparse MAE, for the dense baseline with mask tokens: catches a dead dense encoder
    (tried: its output times 0: the loss then fell only from 1.01 to 0.94; measured unbroken: 1.01 ->
    0.83 in 20 steps, trained features at 0.84 of the zeroed ones' loss)."""
    settings = config(phantom_cache, tmp_path / "dense", steps=20, encoder="dense")
    result = pretrain(settings)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    with_features, with_zeros = masked_unit_losses(trained_mae(settings), phantom_cache)
    assert with_features < 0.95 * with_zeros, (with_features, with_zeros)


def test_killed_run_resumes_to_the_same_weights(phantom_cache, tmp_path):
    steps = 30
    reference = pretrain(config(phantom_cache, tmp_path / "straight", steps=steps))

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "maeformer_fast.cli", "pretrain", "--data", str(phantom_cache),
               "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--num-workers", "0",
               "--checkpoint-every", "3", "--preview-every", "1000", "--log-every", "5", "--seed", "0",
               "--no-progress", "--deterministic"]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "encoder.safetensors").exists(), "the run finished before it could be killed"

    resumed = pretrain(config(phantom_cache, out, steps=steps, resume=True))
    assert len(resumed.losses) < steps  # it really continued from a checkpoint
    rows = list(csv.DictReader((out / "pretrain_log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(5, steps + 1, 5))
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed)  # the resumed part counts on from the killed run's time
    expected = load_encoder(reference.encoder_path).state_dict()
    for name, value in load_encoder(resumed.encoder_path).state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_paused_run_stops_at_a_checkpoint_and_resumes_to_the_same_weights(phantom_cache, tmp_path):
    """``pause`` (the study's ``--max-hours``) ends a run at its first checkpoint that is not the last
    step, writes no encoder, and the resumed run (asked to pause too: its only checkpoint left is the
    last step, which ends the run either way) equals an uninterrupted one bit for bit. Mutation caught:
    the pause check removed (the first run finishes)."""
    settings = dict(steps=6, checkpoint_every=3, log_every=1)
    reference = pretrain(config(phantom_cache, tmp_path / "straight", **settings))
    out = tmp_path / "paused"
    first = pretrain(config(phantom_cache, out, **settings), pause=lambda: True)
    assert first.paused and len(first.losses) == 3
    assert not (out / "encoder.safetensors").exists()
    resumed = pretrain(config(phantom_cache, out, resume=True, **settings), pause=lambda: True)
    assert not resumed.paused and len(resumed.losses) == 3
    assert first.losses + resumed.losses == reference.losses
    expected = load_encoder(reference.encoder_path).state_dict()
    for name, value in load_encoder(resumed.encoder_path).state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_run_folders_are_never_silently_reused_or_misread(phantom_cache, tmp_path):
    out = tmp_path / "run"
    pretrain(config(phantom_cache, out, steps=2, checkpoint_every=1))
    with pytest.raises(FileExistsError, match="pass --resume"):  # a new run over the old one's checkpoints
        pretrain(config(phantom_cache, out, steps=2))
    with pytest.raises(ValueError, match=r"other settings \(lr 0.0005 -> 0.001\)"):
        pretrain(config(phantom_cache, out, steps=4, lr=1e-3, resume=True))
    # Every checkpoint damaged (a damaged newest alone falls back to the one before: test_faults.py).
    for step in ("step-0000001", "step-0000002"):
        (out / "checkpoints" / step / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"step-0000002/state.pt: not a readable training state"):
        pretrain(config(phantom_cache, out, steps=4, resume=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"checkpoint_every": 0}, "checkpoint_every must be"),
        ({"log_every": 0}, "log_every must be"),
        ({"mask_ratio": 0.01}, "hides none of the 12 mask units"),
    ],
)
def test_settings_no_run_can_use_are_refused(phantom_cache, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        pretrain(config(phantom_cache, tmp_path / "run", **overrides))


@pytest.mark.parametrize("encoder", ["sparse", "dense"])
def test_pretraining_runs_on_the_acdc_layout(phantom_cache, tmp_path, encoder):
    """MAE pretraining on the published acdc layout (anisotropic mask unit (4, 32, 32), a (1, 3, 3)
    kernel and an odd-phase downsampling; reduced width) takes its steps and writes an encoder that
    ``load_encoder`` reads back. Catches a plan with the default (2, 2, 2) downsampling strides
    (tried: ``(2, 2, 2)`` in ``plan_encoder``: no even unit size left for the odd-phase conv)."""
    narrow = {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}
    settings = config(phantom_cache, tmp_path / encoder, model="acdc", encoder=encoder, steps=2, log_every=1,
                      crop_size=(8, 32, 32), model_overrides=narrow)  # fmt: skip
    result = pretrain(settings)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert load_encoder(result.encoder_path).config.down_strides == ((1, 2, 2), (2, 2, 2), (2, 2, 2))


def test_holdout_keeps_a_splits_scored_cases_out_of_pretraining(phantom_cache, tmp_path):
    """``holdout``: a split file's validation and test cases are not drawn. Holding out every case
    leaves nothing to pretrain on (so the loader reads the filtered view); holding out all but one
    trains on a view listing that one case alone; a case the data lacks (a split of another dataset)
    and a file that is not a split are refused by name. Mutations seen failing: the loader given
    ``run.cache`` instead of the view (trains on all cases); ``cache_view`` not filtering the plan."""
    cases = [c["id"] for c in load_plan(phantom_cache)["cases"]]
    split = tmp_path / "splits.json"
    split.write_text(json.dumps({"train": [], "val": cases[:2], "test": cases[2:]}))
    with pytest.raises(ValueError, match="no cases to load"):
        pretrain(config(phantom_cache, tmp_path / "none", steps=2, holdout=str(split)))

    split.write_text(json.dumps({"train": [], "val": cases[1:2], "test": cases[2:]}))
    result = pretrain(config(phantom_cache, tmp_path / "one", steps=2, holdout=str(split)))
    assert result.steps == 2
    assert [c["id"] for c in load_plan(tmp_path / "one" / "pretrain_cases")["cases"]] == cases[:1]

    split.write_text(json.dumps({"val": ["case_from_elsewhere"], "test": []}))
    with pytest.raises(ValueError, match="case_from_elsewhere.*another dataset"):
        pretrain(config(phantom_cache, tmp_path / "other", steps=2, holdout=str(split)))
    split.write_text(json.dumps({"train": cases}))
    with pytest.raises(ValueError, match=f"{split}: not a split file"):
        pretrain(config(phantom_cache, tmp_path / "bad", steps=2, holdout=str(split)))
