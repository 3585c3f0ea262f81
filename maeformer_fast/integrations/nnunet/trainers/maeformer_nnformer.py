"""nnU-Net v2 (2.8) trainers that train maeformer_fast's nnFormer: from scratch, or from an encoder
pretrained with ``maeformer pretrain`` (handed over by ``maeformer nnunet-init`` and nnU-Net's own
``-pretrained_weights``).

``export nnUNet_extTrainer=$(maeformer nnunet-trainers)`` lets ``nnUNetv2_train`` and
``nnUNetv2_predict`` find them by name. nnU-Net imports this file as a top-level module (named after
the file), so every import here is absolute. docs/nnunet.md has the whole picture.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from maeformer_fast.device import resolve_compile
from maeformer_fast.integrations.nnunet.environment import missing_nnunet
from maeformer_fast.integrations.nnunet.network import (
    NNUNetNNFormer,
    deep_supervision_scales,
    nnformer_config,
    plain_network,
)
from maeformer_fast.integrations.nnunet.schedule import IterationScheduler, recipe_optimizer
from maeformer_fast.models.config import NNFormerConfig
from maeformer_fast.train.recipes import RECIPE_FIELDS, RECIPES, describe, recipe_values

try:
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
except ImportError as error:  # a clear message with the install command instead of a bare module name
    raise missing_nnunet(error) from error


# The trainer attribute of each recipe field where nnU-Net has its own name for it.
TRAINER_ATTRIBUTE = {"lr": "initial_lr"}


class BudgetedTrainer(nnUNetTrainer):
    """An nnU-Net trainer whose class attributes may replace nnU-Net's training length and checkpoint
    interval, which its ``__init__`` sets on the instance.

    On the CPU it also keeps ``OMP_NUM_THREADS`` where that is set: ``nnUNetv2_train -device cpu`` sets
    torch to every core, so runs meant to share a machine (one thread each) would compete for all cores.

    Attributes:
        short_budget: (epochs, iterations per epoch, validation iterations per epoch) instead of
            nnU-Net's 1000 x 250 (x 50), or None.
        save_every_epochs: epochs between two ``checkpoint_latest.pth`` (what ``--c`` continues
            from), or None for nnU-Net's 50.
    """

    short_budget: tuple[int, int, int] | None = None
    save_every_epochs: int | None = None

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature, which it inspects)
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.short_budget is not None:
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = (
                self.short_budget
            )
        if self.save_every_epochs is not None:
            self.save_every = self.save_every_epochs
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if self.device.type == "cpu" and threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))


class nnUNetTrainer_nnFormer(BudgetedTrainer):
    """nnFormer from random initialisation, with the converged hippocampus study's scratch recipe.

    nnU-Net's data, augmentation, Dice + CE loss, epochs (1000 x 250 iterations), validation and
    sliding-window inference stay; the network, the optimizer and the schedule are ours. Each class
    attribute below is one setting; a subclass changes it (e.g. ``initial_lr = 1e-2``). Steps are
    optimizer steps, one per nnU-Net iteration (``num_iterations_per_epoch`` per epoch).

    Attributes:
        model_name, model_overrides: the nnFormer built when the plans configuration has no
            ``maeformer_nnformer`` entry (``maeformer nnunet-init`` writes one from the encoder):
            ``models.config.get_config(model_name, **model_overrides)``, by default the study's
            3-stage small config (embedding 32, patch 2, 4^3 windows, total stride 8).
        recipe: the fine-tuning recipe (``train.recipes.RECIPES``) that fills every setting below left
            at None, as ``maeformer finetune`` does for a fixed number of steps (``recipe_values``):
            the peak lr scaled by sqrt(plans batch size / 2), a cosine decay to 0 at the last step
            (nnU-Net predicts with its final checkpoint), and for a budget under four warmups a
            warmup of a quarter of it, the encoder frozen for the study's share of the warmup.
            "scratch" here (lr 5e-3, warmup 1000, weight decay 0.01).
        initial_lr: peak AdamW learning rate after the warmup. nnU-Net's ``__init__`` sets its own
            SGD value on the instance; ``configure_optimizers`` replaces it with the one used.
        weight_decay: AdamW's decoupled weight decay, not on norms, biases and bias tables.
        warmup_steps: linear warmup from ``initial_lr / warmup_steps`` to ``initial_lr``.
        lr_schedule: after the warmup, "decay" (cosine to 0 at ``num_epochs * num_iterations_per_epoch``)
            or "constant" (the study's, whose runs stopped on a plateau).
        layer_decay: encoder stage i of n trains at ``layer_decay ** (n - i)`` of the lr, the
            embedding at ``layer_decay ** (n + 1)``; 1 = one lr for all.
        freeze_encoder_steps: the encoder's weights (and AdamW moments) stay fixed for the first N
            steps.
        short_budget, save_every_epochs: see :class:`BudgetedTrainer`.

    The recipes were tuned at batch 2 on 32x48x32 crops: with nnU-Net's batch size and patch (its
    plans) they are a starting point, not a tuned optimum. The log's first lines give the values used.

    Deep supervision: the heads' outputs at [1, 1/s_1, 1/(s_1 s_2)] of the patch (s_i the encoder's
    downsampling strides; 2 heads for the 3-stage small config, 3 for 4 stages), with the scales
    nnU-Net's target downsampling needs (see ``network.deep_supervision_scales``) and loss weights 1,
    1/2, 1/4, ... normalised (2/3, 1/3 for two heads) -- every head, as the official nnFormer (nnU-Net
    drops its lowest output; here that head would never train).

    ``torch.compile`` follows ``nnUNet_compile`` when it is set and maeformer's default otherwise
    (off until measured faster, ``device.COMPILE_BY_DEFAULT_ON_CUDA``), not nnU-Net's default (on).
    """

    model_name: str = "small"
    model_overrides: dict = {"depths": (2, 2, 2), "num_heads": (2, 4, 8), "window_sizes": ((4, 4, 4),) * 3}
    recipe: str = "scratch"
    initial_lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str | None = None
    layer_decay: float | None = None
    freeze_encoder_steps: int | None = None

    @classmethod
    def nnformer_config(
        cls, configuration_manager: ConfigurationManager, num_input_channels: int, num_output_channels: int
    ) -> tuple[NNFormerConfig, str]:
        """(config, its source) of the nnFormer this trainer builds for a plans configuration."""
        return nnformer_config(
            configuration_manager.configuration,
            cls.model_name,
            cls.model_overrides,
            num_input_channels,
            num_output_channels,
        )

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """The nnFormer of the plans configuration (nnU-Net 2.7+ signature; a classmethod, so that the
        class attributes choose the default config; nnU-Net calls it on the class for prediction)."""
        config, _ = cls.nnformer_config(configuration_manager, num_input_channels, num_output_channels)
        return NNUNetNNFormer(config, enable_deep_supervision)

    def _do_i_compile(self) -> bool:
        if "nnUNet_compile" in os.environ:  # asked: nnU-Net's rules (never on CPU, mps or Windows)
            return super()._do_i_compile()
        return resolve_compile(None, self.device)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        plain_network(self.network).deep_supervision = enabled

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        if not self.enable_deep_supervision:
            return None
        return deep_supervision_scales(
            plain_network(self.network).config, self.configuration_manager.patch_size
        )

    def _build_loss(self) -> nn.Module:
        loss = super()._build_loss()
        if not self.enable_deep_supervision:
            return loss
        weights = [0.5**i for i in range(len(loss.weight_factors))]
        return DeepSupervisionWrapper(loss.loss, [w / sum(weights) for w in weights])

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: one per nnU-Net training iteration."""
        return self.num_epochs * self.num_iterations_per_epoch

    def recipe_settings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(settings used, the recipe's own for this budget and batch), each keyed by
        ``train.recipes.RECIPE_FIELDS``: the recipe's value where the class leaves a setting None."""
        recipe = recipe_values(
            self.recipe, self.total_steps, until_plateau=False, batch=self.configuration_manager.batch_size
        )
        cls = type(self)  # nnU-Net's __init__ set its own initial_lr and weight_decay on the instance
        own = {key: getattr(cls, TRAINER_ATTRIBUTE.get(key, key)) for key in RECIPE_FIELDS}
        return {key: recipe[key] if own[key] is None else own[key] for key in RECIPE_FIELDS}, recipe

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, IterationScheduler]:
        settings, _ = self.recipe_settings()
        for key, value in settings.items():  # on the instance: nnU-Net's debug.json and train_step read them
            setattr(self, TRAINER_ATTRIBUTE.get(key, key), value)
        return recipe_optimizer(
            plain_network(self.network),
            settings["lr"],
            settings["weight_decay"],
            settings["layer_decay"],
            settings["warmup_steps"],
            settings["lr_schedule"],
            self.total_steps,
            self.num_iterations_per_epoch,
        )

    def on_train_start(self) -> None:
        super().on_train_start()
        config = plain_network(self.network).config
        _, source = self.nnformer_config(self.configuration_manager, config.in_channels, config.num_classes)
        self.print_to_log_file(f"nnFormer from {source}: {config}", add_timestamp=False)
        settings, recipe = self.recipe_settings()
        self.print_to_log_file(describe(self.recipe, settings, recipe, self.total_steps), add_timestamp=False)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step with the encoder frozen while ``iteration < freeze_encoder_steps`` (no
        gradient: AdamW leaves its weights and moments untouched), then one scheduler step."""
        if self.freeze_encoder_steps:
            step = self.lr_scheduler.iteration
            plain_network(self.network).encoder.requires_grad_(step >= self.freeze_encoder_steps)
        result = super().train_step(batch)
        self.lr_scheduler.step()
        return result


class nnUNetTrainer_nnFormerMAE(nnUNetTrainer_nnFormer):
    """nnFormer from an MAE-pretrained encoder, with the recipe the converged hippocampus study chose
    for it (``RECIPES["mae"]``: AdamW at lr 3e-3, warmup 1000 steps, weight decay 0.01, layer decay
    0.75, encoder frozen for the first 500 steps), scaled to nnU-Net's batch and budget as described
    in :class:`nnUNetTrainer_nnFormer`.

    The weights come through nnU-Net's own flag: ``maeformer nnunet-init ENCODER --dataset D --out
    init.pth``, then ``nnUNetv2_train D 3d_fullres FOLD -tr nnUNetTrainer_nnFormerMAE
    -pretrained_weights init.pth``. Without ``-pretrained_weights`` it trains this recipe from random
    weights.
    """

    recipe = "mae"


# 5 epochs of 10 iterations and 5 validation iterations: a check that everything runs. Its 50 steps
# keep the recipe's full warmup (no short-budget scaling), so that all fall within it and, with the
# MAE recipe, within the frozen encoder's 500: tests see the pretrained encoder untouched.
FIVE_EPOCHS = (5, 10, 5)


class nnUNetTrainer_nnFormer_5epochs(nnUNetTrainer_nnFormer):
    """:class:`nnUNetTrainer_nnFormer` for 5 epochs of 10 iterations, with the recipe's full warmup."""

    short_budget = FIVE_EPOCHS
    warmup_steps = RECIPES["scratch"].warmup_steps


class nnUNetTrainer_nnFormerMAE_5epochs(nnUNetTrainer_nnFormerMAE):
    """:class:`nnUNetTrainer_nnFormerMAE` for 5 epochs of 10 iterations, with the recipe's full warmup
    and encoder freezing."""

    short_budget = FIVE_EPOCHS
    warmup_steps = RECIPES["mae"].warmup_steps
    freeze_encoder_steps = RECIPES["mae"].freeze_encoder_steps


# A budget for comparisons on CPUs: 20 epochs of 25 iterations (500 optimizer steps) with 5
# validation iterations each, and a checkpoint_latest.pth after every epoch so that a stopped run
# continues (``nnUNetv2_train ... --c``) losing at most one epoch. At the study's batch 2 its best
# few-label models came after 600 to 2,000 steps; 500 steps of nnU-Net's batch (7 on hippocampus)
# see about as many crops. results/nnunet_hippocampus/ compares the three trainers at this budget.
BUDGET_500 = (20, 25, 5)


class nnUNetTrainer_nnFormer_500it(nnUNetTrainer_nnFormer):
    """:class:`nnUNetTrainer_nnFormer` for 500 steps (20 epochs of 25 iterations)."""

    short_budget = BUDGET_500
    save_every_epochs = 1


class nnUNetTrainer_nnFormerMAE_500it(nnUNetTrainer_nnFormerMAE):
    """:class:`nnUNetTrainer_nnFormerMAE` for 500 steps (20 epochs of 25 iterations)."""

    short_budget = BUDGET_500
    save_every_epochs = 1


class nnUNetTrainer_500it(BudgetedTrainer, nnUNetTrainer):
    """nnU-Net's own trainer and network (its CNN, SGD with its poly schedule) for the same 500 steps:
    the baseline nnU-Net users know, at the budget of the ``_500it`` nnFormer trainers."""

    short_budget = BUDGET_500
    save_every_epochs = 1
