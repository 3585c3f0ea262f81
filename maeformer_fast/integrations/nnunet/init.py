"""``maeformer nnunet-init``: an nnU-Net ``-pretrained_weights`` checkpoint from a pretrained encoder.

nnU-Net's ``-pretrained_weights`` (``run/load_pretrained_weights.py``) reads ``["network_weights"]``
and requires every tensor of the network it built but ``.seg_layers.``, with equal shapes: an encoder
alone does not load. So the checkpoint here holds the whole network the trainer builds for the plans:
the encoder's tensors from the given file, the decoder and heads freshly initialised with a fixed seed.

The encoder's architecture must also be the one the trainer builds, at training and at prediction:
it is recorded in the plans file, as the configuration's ``maeformer_nnformer`` entry
(``network.PLANS_KEY``; nnU-Net copies the plans into its results folder, where ``nnUNetv2_predict``
reads them). Nothing is written unless the encoder fits exactly.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...data.io import atomic_write_text
from ...models.config import NNFormerConfig
from ...models.official import PUBLISHED, load_official
from ...models.pretrained import load_encoder_tensors, read_encoder_file
from ...weights import atomic_write_bytes
from .environment import require_nnunet
from .network import PLANS_KEY, check_patch_size, plain_network
from .split import resolve_dataset_folder


@dataclass(frozen=True)
class InitResult:
    """A written hand-off: the checkpoint, the plans file holding the architecture, the network's
    config and tensor counts."""

    out: Path
    plans: Path
    config: NNFormerConfig
    encoder_tensors: int
    network_tensors: int


def read_encoder(path: str | Path, official: str | None = None) -> tuple[dict[str, Tensor], NNFormerConfig]:
    """(encoder state dict without the ``encoder.`` prefix, its config) of ``path``: an
    ``encoder.safetensors`` of ``maeformer pretrain``, a model file of ``maeformer finetune`` /
    ``import-official``, or with ``official`` (synapse, acdc, tumor) an official nnFormer checkpoint,
    read with ``torch.load(weights_only=True)`` (``models.official``)."""
    if official is not None:
        if official not in PUBLISHED:
            raise ValueError(f"--official must be one of {list(PUBLISHED)}, got {official!r}")
        model = load_official(path, official)
        return model.encoder.state_dict(), model.config
    try:
        tensors, config, _ = read_encoder_file(path)
    except ValueError as error:
        raise ValueError(
            f"{error} (an official nnFormer checkpoint? pass --official {'|'.join(PUBLISHED)})"
        ) from error
    return tensors, config


def trainer_class(name: str) -> type:
    """The trainer ``name``: one of ours, else whatever nnU-Net's own lookup finds (its trainers, then
    the ``nnUNet_extTrainer`` folders) -- which must build an nnFormer (a subclass of ours)."""
    from .trainers import maeformer_nnformer

    found = getattr(maeformer_nnformer, name, None)
    if not (isinstance(found, type) and issubclass(found, maeformer_nnformer.nnUNetTrainer)):
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        try:
            found = recursive_find_trainer_class_by_name(name)
        except RuntimeError as error:  # nnU-Net's "could not find" (with where it looked)
            raise ValueError(str(error)) from error
    if not hasattr(found, "nnformer_config"):
        raise ValueError(
            f"trainer {name} does not build maeformer's nnFormer; use nnUNetTrainer_nnFormerMAE or a subclass"
        )
    return found


def nnunet_init(
    encoder: str | Path,
    dataset: str,
    out: str | Path,
    configuration: str = "3d_fullres",
    plans: str = "nnUNetPlans",
    trainer: str = "nnUNetTrainer_nnFormerMAE",
    official: str | None = None,
    seed: int = 0,
) -> InitResult:
    """Write ``out``, a checkpoint ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS
    -pretrained_weights OUT`` loads, and record the encoder's architecture in the plans.

    Args:
        encoder: the pretrained encoder (see :func:`read_encoder`).
        dataset: nnU-Net dataset id or name (resolved under ``$nnUNet_preprocessed``) or its folder.
        out: the checkpoint to write (``{"network_weights": state dict, "maeformer": provenance}``).
        configuration, plans: the plans configuration the network is trained with.
        trainer: the trainer class that will build the network.
        official: the published configuration of an official nnFormer checkpoint.
        seed: seeds the decoder and heads' initialisation.

    Raises:
        ValueError: naming what does not fit -- input channels, a patch size the encoder cannot take,
            missing, unexpected or differently shaped encoder tensors; nothing is written then.
    """
    require_nnunet()
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = resolve_dataset_folder(str(dataset))
    plans_path = folder / f"{plans}.json"
    if not plans_path.is_file():
        found = ", ".join(sorted(p.stem for p in folder.glob("*Plans*.json"))) or "none"
        raise FileNotFoundError(f"{plans_path}: no such plans file (plans in {folder}: {found})")
    plans_dict = json.loads(plans_path.read_text())
    if configuration not in plans_dict.get("configurations", {}):
        known = ", ".join(plans_dict.get("configurations", {}))
        raise ValueError(f"{plans_path}: no configuration {configuration!r} (it has: {known})")
    tensors, encoder_config = read_encoder(encoder, official)

    # The encoder's architecture, as the nnU-Net network uses it: the correct bias index (rows of an
    # official checkpoint are converted on load) and plain windows (every grid size, as in training).
    recorded = replace(encoder_config, official_bias_index=False, cyclic_windows=False)
    entry: dict[str, Any] = {"model_config": recorded.to_dict(), "encoder": str(Path(encoder).resolve())}
    plans_dict["configurations"][configuration][PLANS_KEY] = entry
    plans_manager = PlansManager(copy.deepcopy(plans_dict))
    configuration_manager = plans_manager.get_configuration(configuration)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    in_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    if encoder_config.in_channels != in_channels:
        raise ValueError(
            f"{encoder}: the encoder takes {encoder_config.in_channels} input channel(s), the "
            f"{configuration} network of {folder.name} gets {in_channels} (its dataset.json channel_names"
            f"{', plus the previous stage' if configuration_manager.previous_stage_name else ''})"
        )
    num_classes = plans_manager.get_label_manager(dataset_json).num_segmentation_heads

    trainer_type = trainer_class(trainer)
    torch.manual_seed(seed)  # the decoder and heads: the same for the same seed
    built = trainer_type.build_network_architecture(
        plans_manager, configuration_manager, in_channels, num_classes
    )
    network = plain_network(built)
    check_patch_size(network.config, configuration_manager.patch_size)
    load_encoder_tensors(network, tensors, encoder_config, encoder)

    provenance = {
        "encoder": str(encoder),
        "official": official,
        "dataset": folder.name,
        "plans": plans,
        "configuration": configuration,
        "trainer": trainer,
        "seed": seed,
        "model_config": network.config.to_dict(),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"network_weights": state, "maeformer": provenance}, buffer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())
    atomic_write_text(plans_path, json.dumps(plans_dict, indent=4))  # nnU-Net's own layout (save_json)
    return InitResult(out, plans_path, network.config, len(tensors), len(state))
