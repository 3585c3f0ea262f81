"""nnFormer as an nnU-Net v2 network: which nnFormer a plans configuration builds, the network whose
deep supervision nnU-Net switches, and the deep-supervision scales nnU-Net's targets need.

Plans are read as plain dicts here (no nnunetv2 import); the trainers add nnU-Net's classes.

Which nnFormer: ``maeformer nnunet-init`` records the encoder's model config in the plans, as the
entry :data:`PLANS_KEY` of the configuration it was run for (e.g. ``configurations["3d_fullres"]``).
There nnU-Net finds it at every build: in training, and in ``nnUNetv2_predict``, which reads the copy of
the plans that training puts in the results folder -- a network is rebuilt from the plans and the
trainer's name alone (``build_network_architecture`` gets no checkpoint, environment variables differ
between machines, and a file of our own beside the plans would not travel with the results). A
configuration without the entry builds the trainer's default config (its class attributes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor, nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from ...models.config import NNFormerConfig, get_config
from ...models.nnformer import NNFormer
from ...models.plan import plan_encoder

PLANS_KEY = "maeformer_nnformer"  # {"model_config": NNFormerConfig.to_dict(), "encoder": its source}


class NNUNetNNFormer(NNFormer):
    """An nnFormer whose deep supervision nnU-Net switches with :attr:`deep_supervision`.

    On: every head's logits [(B, K, Z, Y, X), (B, K, Z / s_1, ...), ...], full resolution first, in
    training and in nnU-Net's validation steps (eval mode); off: the full-resolution (B, K, Z, Y, X)
    alone (nnU-Net's final validation and sliding-window prediction). Every head exists either way, so
    one state dict serves training and prediction; its keys are ``NNFormer``'s, so its weights also load
    into a plain ``NNFormer``.
    """

    def __init__(self, config: NNFormerConfig, deep_supervision: bool) -> None:
        super().__init__(replace(config, deep_supervision=True))
        self.deep_supervision = deep_supervision

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        outputs = self.segment(x, self.deep_supervision)
        return outputs if self.deep_supervision else outputs[0]


def plain_network(network: nn.Module) -> NNUNetNNFormer:
    """The network inside nnU-Net's DistributedDataParallel and torch.compile wrappers."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network  # type: ignore[return-value]


def nnformer_config(
    configuration: dict[str, Any],
    default_model: str,
    default_overrides: dict[str, Any],
    in_channels: int,
    num_classes: int,
) -> tuple[NNFormerConfig, str]:
    """(config, where its architecture came from) of the nnFormer for a resolved plans configuration.

    The architecture is the configuration's :data:`PLANS_KEY` entry, else ``get_config(default_model,
    **default_overrides)``; the input channels and classes are nnU-Net's (``in_channels``, and
    ``num_classes`` = its segmentation heads), the crop its patch size, and deep supervision on (the
    heads exist; :class:`NNUNetNNFormer` switches it).
    """
    patch = configuration["patch_size"]
    if len(patch) != 3:
        raise ValueError(
            f"nnFormer is a 3D network; this configuration has the {len(patch)}D patch size {patch} "
            "(train a 3d_fullres or 3d_lowres configuration)"
        )
    recorded = configuration.get(PLANS_KEY)
    if recorded is None:
        values = get_config(default_model, **default_overrides).to_dict()
        source = f"the trainer's default ({default_model} with {default_overrides or 'no overrides'})"
    else:
        values = recorded.get("model_config") if isinstance(recorded, dict) else None
        if not isinstance(values, dict):
            raise ValueError(f"plans entry {PLANS_KEY!r} has no model_config: rerun maeformer nnunet-init")
        source = f"the plans entry {PLANS_KEY!r} (encoder {recorded.get('encoder')})"
    fixed = {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "crop_size": tuple(patch),
        "deep_supervision": True,
    }
    try:
        return NNFormerConfig.from_dict({**values, **fixed}), source
    except TypeError as error:  # an unknown or missing field of a hand-edited entry
        raise ValueError(f"{source}: not an nnFormer config ({error})") from error


def deep_supervision_scales(config: NNFormerConfig, patch_size: Sequence[int]) -> list[list[float]]:
    """Per head, full resolution first, per axis: its output size over the patch size.

    nnU-Net makes each head's target by nearest-exact interpolation of the patch's labels to
    ``round(patch * scale)``. The heads give ``ceil(patch / s)`` (``config.output_sizes``), so the
    scale is that size over the patch -- exactly nnU-Net's own ``1 / s`` where ``s`` divides the patch,
    and still the heads' shapes where it does not (e.g. 21 / 2: 11 voxels, where 1 / 2 rounds to 10).
    """
    patch = tuple(patch_size)
    return [[n / p for n, p in zip(size, patch)] for size in config.output_sizes(patch)]  # type: ignore[arg-type]


def check_patch_size(config: NNFormerConfig, patch_size: Sequence[int]) -> None:
    """Raise a ValueError naming the stage and axes where a (Z, Y, X) patch leaves the encoder an
    empty grid; the grids are the model's own plan (strided layers round up, odd-phase ones down)."""
    plan = plan_encoder(config, 1, tuple(patch_size), "cpu")  # type: ignore[arg-type]
    for stage, layout in enumerate(plan.stages):
        empty = [axis for axis, n in zip("ZYX", layout.grid) if n < 1]
        if empty:
            raise ValueError(
                f"patch size {tuple(patch_size)} is too small for the encoder: stage {stage} would have "
                f"no tokens along {', '.join(empty)} (token grid {tuple(layout.grid)})"
            )
