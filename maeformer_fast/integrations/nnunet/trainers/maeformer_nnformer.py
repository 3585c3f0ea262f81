"""nnU-Net v2 (2.8) trainers that train maeformer_fast's nnFormer: from scratch, or from an encoder
pretrained with ``maeformer pretrain`` (handed over by ``maeformer nnunet-init`` and nnU-Net's own
``-pretrained_weights``).

``export nnUNet_extTrainer=$(maeformer nnunet-trainers)`` lets ``nnUNetv2_train`` and
``nnUNetv2_predict`` find them by name. nnU-Net imports this file as a top-level module (named after
the file), so every import here is absolute. docs/nnunet.md has the whole picture.
"""

from __future__ import annotations

import os

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
from maeformer_fast.train.recipes import RECIPES

try:
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
except ImportError as error:  # a clear message with the install command instead of a bare module name
    raise missing_nnunet(error) from error


class nnUNetTrainer_nnFormer(nnUNetTrainer):
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
        initial_lr: peak AdamW learning rate after the warmup (2e-2). nnU-Net's ``__init__`` sets its
            own SGD value on the instance; ours replaces it there.
        weight_decay: AdamW's decoupled weight decay, not on norms, biases and bias tables (0.01).
        warmup_steps: linear warmup from ``initial_lr / warmup_steps`` to ``initial_lr`` (1000 steps).
        lr_schedule: after the warmup, "decay" (cosine to 0 at ``num_epochs * num_iterations_per_epoch``:
            nnU-Net trains a fixed budget and predicts with its final checkpoint, as ``finetune`` does
            for a fixed ``steps``) or "constant" (the study's, whose runs stopped on a plateau).
        layer_decay: encoder stage i of n trains at ``layer_decay ** (n - i)`` of the lr, the
            embedding at ``layer_decay ** (n + 1)``; 1 = one lr for all (1.0).
        freeze_encoder_steps: the encoder's weights (and AdamW moments) stay fixed for the first N
            steps (0).

    The recipe's values come from ``maeformer_fast.train.recipes.RECIPES["scratch"]``, tuned at batch 2
    on 32x48x32 crops: with nnU-Net's batch size and patch (its plans) they are a starting point, not
    a tuned optimum. The study's step maximum is not used: nnU-Net's ``num_epochs`` decides.

    Deep supervision: the heads' outputs at [1, 1/s_1, 1/(s_1 s_2)] of the patch (s_i the encoder's
    downsampling strides), with the scales nnU-Net's target downsampling needs (see
    ``network.deep_supervision_scales``) and loss weights 1, 1/2, 1/4 normalised -- every head, as the
    official nnFormer (nnU-Net drops its lowest output; here that head would never train).

    ``torch.compile`` follows ``nnUNet_compile`` when it is set and maeformer's default otherwise
    (off until measured faster, ``device.COMPILE_BY_DEFAULT_ON_CUDA``), not nnU-Net's default (on).
    """

    model_name: str = "small"
    model_overrides: dict = {"depths": (2, 2, 2), "num_heads": (2, 4, 8), "window_sizes": ((4, 4, 4),) * 3}
    initial_lr: float = RECIPES["scratch"].lr
    weight_decay: float = RECIPES["scratch"].weight_decay
    warmup_steps: int = RECIPES["scratch"].warmup_steps
    lr_schedule: str = "decay"  # nnU-Net runs a fixed number of epochs and predicts with the final model
    layer_decay: float = RECIPES["scratch"].layer_decay
    freeze_encoder_steps: int = RECIPES["scratch"].freeze_encoder_steps
    # (epochs, iterations per epoch, validation iterations per epoch) instead of nnU-Net's; None: its own
    short_budget: tuple[int, int, int] | None = None

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature, which it inspects)
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net's __init__ sets its SGD values on the instance, hiding the class's: take ours back.
        self.initial_lr, self.weight_decay = type(self).initial_lr, type(self).weight_decay
        if self.short_budget is not None:  # the same for its epoch counts, set on the instance too
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = (
                self.short_budget
            )

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

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, IterationScheduler]:
        return recipe_optimizer(
            plain_network(self.network),
            self.initial_lr,
            self.weight_decay,
            self.layer_decay,
            self.warmup_steps,
            self.lr_schedule,
            self.num_epochs * self.num_iterations_per_epoch,
            self.num_iterations_per_epoch,
        )

    def on_train_start(self) -> None:
        super().on_train_start()
        config = plain_network(self.network).config
        _, source = self.nnformer_config(self.configuration_manager, config.in_channels, config.num_classes)
        self.print_to_log_file(f"nnFormer from {source}: {config}", add_timestamp=False)

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
    for it (``RECIPES["mae"]``): AdamW at lr 3e-3 (``initial_lr``), warmup 1000 steps then constant,
    weight decay 0.01, layer decay 0.75, encoder frozen for the first 500 steps.

    The weights come through nnU-Net's own flag: ``maeformer nnunet-init ENCODER --dataset D --out
    init.pth``, then ``nnUNetv2_train D 3d_fullres FOLD -tr nnUNetTrainer_nnFormerMAE
    -pretrained_weights init.pth``. Without ``-pretrained_weights`` it trains this recipe from random
    weights. See :class:`nnUNetTrainer_nnFormer` for the attributes.
    """

    initial_lr: float = RECIPES["mae"].lr
    weight_decay: float = RECIPES["mae"].weight_decay
    warmup_steps: int = RECIPES["mae"].warmup_steps
    layer_decay: float = RECIPES["mae"].layer_decay
    freeze_encoder_steps: int = RECIPES["mae"].freeze_encoder_steps


# 5 epochs of 10 iterations and 5 validation iterations: a check that everything runs (50 steps, all
# within the warmup; with the MAE recipe all with the encoder frozen).
FIVE_EPOCHS = (5, 10, 5)


class nnUNetTrainer_nnFormer_5epochs(nnUNetTrainer_nnFormer):
    """:class:`nnUNetTrainer_nnFormer` for 5 epochs of 10 iterations."""

    short_budget = FIVE_EPOCHS


class nnUNetTrainer_nnFormerMAE_5epochs(nnUNetTrainer_nnFormerMAE):
    """:class:`nnUNetTrainer_nnFormerMAE` for 5 epochs of 10 iterations."""

    short_budget = FIVE_EPOCHS
