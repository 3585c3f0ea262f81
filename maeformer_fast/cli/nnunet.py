"""``maeformer nnunet-trainers``, ``nnunet-init`` and ``nnunet-compare``: nnFormer inside nnU-Net v2."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

INIT_DESCRIPTION = """\
Write a checkpoint for nnU-Net's own -pretrained_weights flag: the whole network the trainer builds for
the plans configuration, its encoder from ENCODER, decoder and heads new (seeded). The encoder's
architecture is recorded in the plans file (configuration entry "maeformer_nnformer"), where the
trainers find it at training and prediction. Nothing is written unless every encoder tensor fits.

  export nnUNet_extTrainer=$(maeformer nnunet-trainers)
  maeformer nnunet-init encoder.safetensors --dataset 4 --out init.pth
  nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainer_nnFormerMAE -pretrained_weights init.pth
"""


def add_trainer_commands(subparsers: Any) -> None:
    """Register ``nnunet-trainers``, ``nnunet-init`` and ``nnunet-compare`` on an ``argparse`` subparsers
    object."""
    trainers = subparsers.add_parser(
        "nnunet-trainers",
        help="print the folder of the nnFormer trainers, for nnU-Net's nnUNet_extTrainer",
        description="Print the folder to put in nnU-Net's nnUNet_extTrainer environment variable: "
        "export nnUNet_extTrainer=$(maeformer nnunet-trainers). It holds nnUNetTrainer_nnFormer, "
        "nnUNetTrainer_nnFormerMAE, their _5epochs and _500it variants and nnUNetTrainer_500it "
        "(docs/nnunet.md).",
    )
    trainers.set_defaults(func=cmd_nnunet_trainers)

    init = subparsers.add_parser(
        "nnunet-init",
        help="a pretrained encoder as an nnU-Net -pretrained_weights checkpoint for the nnFormer trainers",
        description=INIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument(
        "encoder",
        metavar="ENCODER",
        help="encoder.safetensors of `maeformer pretrain`, a model.safetensors of `maeformer finetune`, or "
        "with --official an official nnFormer checkpoint",
    )
    init.add_argument("--dataset", required=True,
                      help="nnU-Net dataset id or name (under $nnUNet_preprocessed)")  # fmt: skip
    init.add_argument("--configuration", default="3d_fullres",
                      help="plans configuration (default: 3d_fullres)")  # fmt: skip
    init.add_argument("--plans", default="nnUNetPlans",
                      help="plans identifier, nnUNetv2_train's -p (default: nnUNetPlans)")  # fmt: skip
    init.add_argument("--trainer", default="nnUNetTrainer_nnFormerMAE",
                      help="the trainer that will build the network (default: %(default)s)")  # fmt: skip
    init.add_argument("--official", default=None, choices=["synapse", "acdc", "tumor"],
                      help="ENCODER is an official nnFormer checkpoint of this published config")  # fmt: skip
    init.add_argument("--seed", type=int, default=0, help="seed of the decoder and heads (default: 0)")
    init.add_argument("--out", required=True, help="checkpoint to write (.pth)")
    init.set_defaults(func=cmd_nnunet_init)

    compare = subparsers.add_parser(
        "nnunet-compare",
        help="validation Dice of nnU-Net runs side by side, per trainer and paired by run",
        description="Read every nnU-Net validation summary.json under FOLDER (an nnUNet_results folder "
        "or records laid out as RUN/TRAINER/summary.json) and print Markdown tables: Dice per trainer "
        "(mean ± sd over its runs), every run's foreground mean Dice, and paired differences between "
        "trainers over the runs both have. A run is the summary's path without its trainer folder.",
    )
    compare.add_argument("folder", help="folder searched for summary.json files")
    compare.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    compare.set_defaults(func=cmd_nnunet_compare)


def cmd_nnunet_trainers(args: argparse.Namespace) -> int:
    from ..integrations.nnunet.environment import INSTALL_COMMAND, trainers_folder

    print(trainers_folder())
    if importlib.util.find_spec("nnunetv2") is None:  # on stderr: $(...) takes the folder alone
        print(f"maeformer nnunet-trainers: nnunetv2 is not installed; {INSTALL_COMMAND}", file=sys.stderr)
    return 0


def cmd_nnunet_init(args: argparse.Namespace) -> int:
    from ..integrations.nnunet.init import nnunet_init

    try:
        result = nnunet_init(args.encoder, args.dataset, args.out, args.configuration, args.plans,
                             args.trainer, args.official, args.seed)  # fmt: skip
    except ImportError as error:  # the nnunet extra is missing: one line saying how to install it
        print(f"maeformer nnunet-init: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.out}: {result.network_tensors} tensors, {result.encoder_tensors} of them the "
        f"encoder's; nnFormer recorded in {result.plans} ({args.configuration})\n"
        f"next: nnUNetv2_train {args.dataset} {args.configuration} FOLD -tr {args.trainer} -p {args.plans} "
        f"-pretrained_weights {result.out}"
    )
    return 0


def cmd_nnunet_compare(args: argparse.Namespace) -> int:
    from ..data.io import atomic_write_text
    from ..integrations.nnunet.compare import comparison_markdown, find_results

    text = comparison_markdown(find_results(args.folder))
    print(text, end="")
    if args.out:
        atomic_write_text(Path(args.out), text)
    return 0
