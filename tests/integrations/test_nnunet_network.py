"""The nnFormer trainers' network side, on configurations written by hand (no nnU-Net folders): which
nnFormer a plans configuration builds, deep-supervision outputs against nnU-Net's own target
downsampling, the recipe's per-step schedule inside nnU-Net's epochs, and the error without nnunetv2.

Trainer methods run on stand-in objects holding just the attributes they read (a real trainer needs
nnU-Net's folders: tests/integrations/test_nnunet_train.py builds those).
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from maeformer_fast.integrations.nnunet.network import PLANS_KEY, check_patch_size
from maeformer_fast.models.config import get_config

NEEDS = "the nnU-Net trainers need nnunetv2 (pip install -e '.[nnunet]')"


def configuration(patch: list[int], recorded: dict | None = None):
    """An nnU-Net ConfigurationManager with a patch size (and our plans entry when given)."""
    plans = pytest.importorskip("nnunetv2.utilities.plans_handling.plans_handler", reason=NEEDS)
    values: dict = {"patch_size": patch, "architecture": {}}
    if recorded is not None:
        values[PLANS_KEY] = {"model_config": recorded, "encoder": "encoder.safetensors"}
    return plans.ConfigurationManager(values)


def trainers():
    """The trainers module (skips the test where nnunetv2 is not installed)."""
    pytest.importorskip("nnunetv2", reason=NEEDS)
    from maeformer_fast.integrations.nnunet.trainers import maeformer_nnformer

    return maeformer_nnformer


def test_deep_supervision_targets_match_outputs_at_every_scale() -> None:
    """For an odd patch (21, 25, 19), nnU-Net's own target downsampling at the trainer's scales gives
    every head's output shape, in training and in nnU-Net's validation steps (eval mode, deep
    supervision on), and one full-size output with deep supervision off (prediction). Mutations seen
    failing: the scales as nnU-Net's own 1 / stride (10 target voxels for 11 outputs along 21); the
    network returning one output in eval mode whatever ``deep_supervision`` says."""
    cls = trainers().nnUNetTrainer_nnFormer
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    patch = [21, 25, 19]
    network = cls.build_network_architecture(None, configuration(patch), 1, 3, True)
    trainer = SimpleNamespace(enable_deep_supervision=True, network=network,
                              configuration_manager=configuration(patch))  # fmt: skip
    scales = cls._get_deep_supervision_scales(trainer)
    labels = torch.randint(0, 3, (1, *patch), dtype=torch.int16)
    targets = DownsampleSegForDSTransform(ds_scales=scales)(segmentation=labels)["segmentation"]
    x = torch.randn(2, 1, *patch)
    for training in (True, False):
        network.train(training)
        cls.set_deep_supervision_enabled(trainer, True)
        with torch.no_grad():
            outputs = network(x)
        assert isinstance(outputs, list) and len(outputs) == len(targets) == 2  # 3 stages: 2 heads
        assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[1:]) for t in targets]
        assert [tuple(t.shape[1:]) for t in targets] == [(21, 25, 19), (11, 13, 10)]
    cls.set_deep_supervision_enabled(trainer, False)
    network.eval()
    with torch.no_grad():
        assert network(x).shape == (2, 3, *patch)


def test_trainer_builds_the_recorded_nnformer_else_its_default() -> None:
    """The configuration's ``maeformer_nnformer`` entry decides the architecture (here embedding 16,
    two stages), nnU-Net the channels and classes; without the entry the class attributes do; nnU-Net
    sees the 2.7+ signature (its own check); a 2D configuration is refused. Mutation seen failing:
    ``nnformer_config`` ignoring the plans entry."""
    cls = trainers().nnUNetTrainer_nnFormerMAE
    assert "plans_manager" in inspect.signature(cls.build_network_architecture).parameters
    recorded = get_config(
        "small", embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_sizes=((4, 4, 4),) * 2
    )
    built = cls.build_network_architecture(None, configuration([16, 20, 20], recorded.to_dict()), 2, 4, False)
    config = built.config
    assert (config.embed_dim, config.depths, config.in_channels, config.num_classes) == (16, (2, 2), 2, 4)
    assert config.deep_supervision and not built.deep_supervision  # every head exists, one output

    default = cls.build_network_architecture(None, configuration([16, 20, 20]), 1, 3).config
    expected = get_config(cls.model_name, **cls.model_overrides)
    assert (default.embed_dim, default.depths) == (expected.embed_dim, expected.depths) == (32, (2, 2, 2))
    with pytest.raises(ValueError, match="3D network"):
        cls.build_network_architecture(None, configuration([64, 64]), 1, 3)


def stand_in_trainer(cls, network, epochs: int, iterations: int, batch: int):
    """A ``cls`` instance holding only what ``configure_optimizers`` and ``recipe_settings`` read (not
    built by nnU-Net's ``__init__``, which needs its folders), with nnU-Net's own initial_lr and
    weight_decay set on the instance as its ``__init__`` does."""
    trainer = object.__new__(cls)
    trainer.network, trainer.num_epochs, trainer.num_iterations_per_epoch = network, epochs, iterations
    trainer.configuration_manager = SimpleNamespace(batch_size=batch)
    trainer.initial_lr, trainer.weight_decay = 1e-2, 3e-5
    return trainer


def test_recipes_scale_to_nnunet_batch_and_budget() -> None:
    """The trainers' settings follow ``maeformer finetune``'s rules, checked by hand: at nnU-Net's
    batch 8 the MAE lr is 3e-3 x sqrt(8 / 2) = 6e-3 and the scratch lr 5e-3 x 2 = 1e-2; 1000 x 250 steps
    keep the 1000-step warmup and 500 frozen steps; the 500-step budget gets a warmup of 125 and 62
    frozen steps (500 x 125 // 1000); a subclass's own value wins; nnU-Net's SGD lr on the instance
    is not used. Mutations seen failing: the batch not passed (lr 3e-3 at batch 8); the class values
    read from the instance (nnU-Net's 1e-2)."""
    module = trainers()
    network = module.nnUNetTrainer_nnFormer.build_network_architecture(
        None, configuration([16, 20, 20]), 1, 3
    )

    def settings(cls, epochs: int, iterations: int, batch: int) -> dict:
        return stand_in_trainer(cls, network, epochs, iterations, batch).recipe_settings()[0]

    mae = settings(module.nnUNetTrainer_nnFormerMAE, 1000, 250, 8)
    assert mae == {"lr": pytest.approx(6e-3), "warmup_steps": 1000, "weight_decay": 0.01, "layer_decay": 0.75,
                   "freeze_encoder_steps": 500, "lr_schedule": "decay"}  # fmt: skip
    scratch = settings(module.nnUNetTrainer_nnFormer, 1000, 250, 8)
    assert scratch["lr"] == pytest.approx(1e-2) and scratch["layer_decay"] == 1.0
    short = settings(module.nnUNetTrainer_nnFormerMAE_500it, 20, 25, 2)
    assert (short["lr"], short["warmup_steps"], short["freeze_encoder_steps"]) == (
        pytest.approx(3e-3),
        125,
        62,
    )
    smoke = settings(module.nnUNetTrainer_nnFormerMAE_5epochs, 5, 10, 2)  # keeps the full warmup on purpose
    assert (smoke["warmup_steps"], smoke["freeze_encoder_steps"]) == (1000, 500)
    own = type("OwnLR", (module.nnUNetTrainer_nnFormerMAE,), {"initial_lr": 1e-4})
    assert settings(own, 1000, 250, 8)["lr"] == 1e-4


def test_recipe_schedule_counts_steps_across_epochs() -> None:
    """The MAE recipe's optimizer: decoder and heads at lr 3e-3 after a 1000-step warmup, encoder stage
    i of 3 at 0.75^(3 - i) of it, the embedding at 0.75^4; nnU-Net's epoch call places the schedule at
    epoch x iterations (a resumed run continues it), and in an uninterrupted run it moves nothing.
    Mutations seen failing: ``IterationScheduler.step(epoch)`` ignoring the epoch (a resumed run
    restarts the warmup); ``layer_decay`` not passed to the parameter groups."""
    module = trainers()
    cls = module.nnUNetTrainer_nnFormerMAE
    network = cls.build_network_architecture(None, configuration([16, 20, 20]), 1, 3)

    def optimizer_and_schedule():
        trainer = stand_in_trainer(cls, network, epochs=1000, iterations=250, batch=2)
        optimizer, schedule = trainer.configure_optimizers()
        assert (trainer.initial_lr, trainer.freeze_encoder_steps) == (3e-3, 500)  # set for train_step
        return optimizer, schedule

    def lr_of(optimizer, prefix: str) -> float:
        named = dict(network.named_parameters())
        return next(g["lr"] for g in optimizer.param_groups if any(p is named[prefix] for p in g["params"]))

    optimizer, schedule = optimizer_and_schedule()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 / 1000)  # group 0: what nnU-Net logs
    schedule.step(0)  # epoch 0 starts
    optimizer.step()  # no gradients: changes nothing, but torch wants a scheduler step after one
    for _ in range(250):
        schedule.step()
    schedule.step(1)  # epoch 1 starts: already there
    assert schedule.iteration == 250
    assert lr_of(optimizer, "decoder.0.upsample.up.weight") == pytest.approx(3e-3 * 251 / 1000)

    resumed_optimizer, resumed = optimizer_and_schedule()
    resumed.step(5)  # a run resumed at epoch 5 (--c): step 1250, past the warmup
    assert resumed.iteration == 1250
    # cosine after the warmup, by hand: 250 of the 249,000 decay steps done
    peak = 3e-3 * 0.5 * (1 + math.cos(math.pi * 250 / 249_000))
    assert lr_of(resumed_optimizer, "heads.0.weight") == pytest.approx(peak)
    for stage in range(3):
        name = f"encoder.stages.{stage}.blocks.0.attn.qkv.weight"
        assert lr_of(resumed_optimizer, name) == pytest.approx(peak * 0.75 ** (3 - stage))
    embedding = lr_of(resumed_optimizer, "encoder.patch_embed.layers.0.conv.weight")
    assert embedding == pytest.approx(peak * 0.75**4)


def test_patch_size_the_encoder_cannot_take_is_named() -> None:
    """ACDC's last downsampling keeps only whole pairs of slices (odd phase): a one-slice patch leaves
    stage 3 no tokens in depth, and the error names the stage and the axis. Mutation seen failing:
    ``check_patch_size`` testing ``n < 0`` instead of ``n < 1`` (an empty grid passes)."""
    acdc = get_config("acdc")
    check_patch_size(acdc, (14, 160, 160))
    with pytest.raises(ValueError, match=r"stage 3 would have no tokens along Z"):
        check_patch_size(acdc, (1, 64, 64))


BLOCK_NNUNET = """
import sys
sys.modules["nnunetv2"] = None  # importing it raises ImportError, as where it is not installed
import maeformer_fast.integrations.nnunet, maeformer_fast.integrations.nnunet.network
try:
    import maeformer_fast.integrations.nnunet.trainers.maeformer_nnformer
except ImportError as error:
    print(error.name, error)
from maeformer_fast.cli.main import main
sys.exit(main(["nnunet-init", "encoder.safetensors", "--dataset", "4", "--out", "init.pth"]))
"""


def test_without_nnunetv2_the_error_says_how_to_install() -> None:
    """Where nnunetv2 does not import, the integration package and its network module still import;
    the trainers module and ``maeformer nnunet-init`` say what to install, with the pinned torch (one
    line, exit 2). Mutation seen failing: the trainers module importing nnunetv2 without the
    ``missing_nnunet`` message (a bare ModuleNotFoundError)."""
    result = subprocess.run([sys.executable, "-c", BLOCK_NNUNET], capture_output=True, text=True)
    install = 'pip install torch==2.14.1 torchvision==0.29.1 -e ".[nnunet]"'
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout.startswith("nnunetv2 ") and install in result.stdout
    assert result.stderr.startswith("maeformer nnunet-init: error:") and install in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
