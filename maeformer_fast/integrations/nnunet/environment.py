"""What the nnFormer trainers need in a shell: nnunetv2 with a working torchvision (the ``nnunet``
extra), and the folder ``nnUNet_extTrainer`` must name. Importing this module needs neither."""

from __future__ import annotations

from pathlib import Path

# The versions the integration is tested with (.ci/run); torch first, so that installing nnunetv2 does
# not replace it with another build.
INSTALL_COMMAND = (
    "pip install torch==2.14.1 torchvision==0.29.1 && "
    'pip install torch==2.14.1 torchvision==0.29.1 -e ".[nnunet]"'
)


def missing_nnunet(error: ImportError) -> ImportError:
    """The error to raise when nnunetv2 or torchvision does not import: what failed and how to install.
    Its ``name`` is "nnunetv2", the package of the ``nnunet`` extra."""
    return ImportError(
        f"the nnU-Net integration needs nnunetv2 2.8 and a torchvision matching torch ({error}); "
        f"install them with: {INSTALL_COMMAND}",
        name="nnunetv2",
    )


def require_nnunet() -> None:
    """Import nnunetv2 and torchvision, or raise :func:`missing_nnunet`'s error.

    torchvision too: nnU-Net looks a trainer up by importing every built-in trainer module first, and
    the Primus ones import timm, which imports torchvision -- without a working one, ``nnUNetv2_train``
    fails whatever the trainer."""
    try:
        import nnunetv2  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as error:
        raise missing_nnunet(error) from error


def trainers_folder() -> Path:
    """The folder for ``export nnUNet_extTrainer=...``: it holds only the trainer module(s), which
    nnU-Net imports as top-level modules when it looks a trainer up by name."""
    return Path(__file__).resolve().parent / "trainers"
