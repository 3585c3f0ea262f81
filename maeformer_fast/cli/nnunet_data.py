"""nnU-Net v2 data on the command line: ``maeformer nnunet-split``, and nnU-Net preprocessed
configuration folders as ``--data`` of ``pretrain`` (and as the source of ``preprocess``).

:func:`register` adds the command and wraps the ``pretrain``, ``finetune`` and ``preprocess`` commands
the main parser registered before it: a configuration folder is converted into a maeformer cache
(``integrations/nnunet/preprocessed.py``) and the command runs on that cache; every other ``--data``
goes to the command untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Command = Callable[[argparse.Namespace], int]

SPLIT_DESCRIPTION = """\
Write $nnUNet_preprocessed/<dataset>/splits_final.json so that nnU-Net's fold 0 trains on --labeled N
cases drawn by --seed S from a training pool and validates on a fixed set of cases. Test and
validation cases are drawn by --split-seed alone (the shares of `maeformer finetune`), the same for
every N and S, so the validation Dice of all runs compare; test cases are in no fold. For the same
cases and seeds, fold 0 is exactly the split `maeformer finetune --labeled N --seed S --split-seed K`
uses. Train fold 0 only (nnUNetv2_train D CONFIG 0): other folds fall back to nnU-Net's random 80:20
split, test cases included. The seeds, pool and test cases are recorded in splits_final.maeformer.json
next to it. A different existing splits_final.json is replaced only with --force (kept as .bakN)."""


def register(sub: Any) -> None:
    """Add ``nnunet-split`` to the subparsers ``sub`` and let ``pretrain``, ``finetune`` and
    ``preprocess`` (registered before) recognise nnU-Net preprocessed folders as ``--data`` / SRC."""
    from ..train.finetune import FinetuneConfig

    split = sub.add_parser(
        "nnunet-split",
        help="few-label fold 0 for nnU-Net v2: splits_final.json with N labeled training cases",
        description=SPLIT_DESCRIPTION,
    )
    split.add_argument(
        "--dataset",
        required=True,
        help="nnU-Net dataset id (4), name (Dataset004_Hippocampus) or its folder in $nnUNet_preprocessed",
    )
    split.add_argument("--labeled", type=int, required=True, help="labeled training cases of fold 0")
    split.add_argument(
        "--seed", type=int, default=0, help="draws the labeled cases from the pool (default: 0)"
    )
    split.add_argument(
        "--split-seed",
        type=int,
        default=FinetuneConfig.split_seed,
        help="draws the fixed test and validation cases; keep it fixed across runs you compare "
        "(default: %(default)s)",
    )
    split.add_argument(
        "--val-fraction",
        type=float,
        default=FinetuneConfig.val_fraction,
        help="share of the cases in the fixed validation set (default: %(default)s)",
    )
    split.add_argument(
        "--test-fraction",
        type=float,
        default=FinetuneConfig.test_fraction,
        help="share of the cases held out as test cases (default: %(default)s)",
    )
    split.add_argument(
        "--force", action="store_true", help="replace a different splits_final.json (kept as .bakN)"
    )
    split.set_defaults(func=cmd_nnunet_split)

    for name, wrap in (("pretrain", _pretrain), ("finetune", _finetune), ("preprocess", _preprocess)):
        parser = sub.choices[name]
        parser.set_defaults(func=wrap(parser.get_default("func")))


def cmd_nnunet_split(args: argparse.Namespace) -> int:
    from ..integrations.nnunet.split import (
        few_label_split,
        resolve_dataset_folder,
        training_cases,
        write_split,
    )

    folder = resolve_dataset_folder(args.dataset)
    cases = training_cases(folder)
    splits = few_label_split(cases, args.labeled, args.seed, args.split_seed, args.val_fraction,
                             args.test_fraction)  # fmt: skip
    settings = {"written_by": "maeformer nnunet-split", "dataset": folder.name, "labeled": args.labeled,
                "seed": args.seed, "split_seed": args.split_seed, "val_fraction": args.val_fraction,
                "test_fraction": args.test_fraction, "cases": len(cases)}  # fmt: skip
    result = write_split(folder, splits, settings, args.force)
    seeds = f"--split-seed {args.split_seed}"
    lines = [
        f"{len(cases)} training cases of {folder.name} (its {Path(folder, 'gt_segmentations')} labels):",
        f"  test, in no fold ({len(splits.test)}, drawn by {seeds}): {', '.join(splits.test)}",
        f"  fold 0 validation ({len(splits.val)}, drawn by {seeds}, the same for every N and seed): "
        + ", ".join(splits.val),
        f"  pool: the other {len(splits.pool)} cases; fold 0 trains on the first {args.labeled} of the pool "
        f"shuffled by --seed {args.seed} (nested in those of a larger N): " + ", ".join(splits.train),
    ]
    print("\n".join(lines))
    if result.backup is not None:
        print(f"the earlier {result.path.name} is kept as {result.backup}")
    state = "wrote" if result.changed else "unchanged:"
    print(f"{state} {result.path} (fold 0 only; train it with nnUNetv2_train {folder.name} CONFIG 0); "
          f"record: {result.record}")  # fmt: skip
    return 0


def _nnunet_folder(data: str) -> bool:
    """Whether ``data`` is an nnU-Net preprocessed configuration folder; a preprocessed *dataset* folder
    there is an error that names its configuration folders."""
    from ..integrations.nnunet.preprocessed import (
        dataset_folder_message,
        is_configuration_folder,
        is_preprocessed_dataset,
    )

    if is_preprocessed_dataset(data):
        raise ValueError(dataset_folder_message(data))
    return is_configuration_folder(data)


def _pretrain(run: Command) -> Command:
    def pretrain(args: argparse.Namespace) -> int:
        if not _nnunet_folder(args.data):
            return run(args)
        from ..data.preprocess import default_cache_dir
        from ..integrations.nnunet.preprocessed import convert_preprocessed, pretrain_crop, read_configuration
        from ..models.config import get_config

        config = read_configuration(args.data)
        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir(config.folder)
        # torchrun: rank 0 converts; the others open that cache once rank 0 shares it in setup_run.
        if int(os.environ.get("RANK", "0")) == 0:
            convert_preprocessed(config.folder, cache, progress=args.progress)
            print(f"pretrain: nnU-Net {config.plans_name} {config.configuration} data of "
                  f"{config.dataset_name} as the cache {cache} (same voxels)", file=sys.stderr)  # fmt: skip
        if args.crop_size is None:
            unit = get_config(args.model, **(args.model_overrides or {})).total_stride
            args.crop_size = list(pretrain_crop(config.patch_size, unit))
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"pretrain: crop {tuple(args.crop_size)}: the plans' patch {config.patch_size} "
                      f"rounded up to the mask unit {unit}", file=sys.stderr)  # fmt: skip
        args.data = str(cache)
        return run(args)

    return pretrain


def _finetune(run: Command) -> Command:
    def finetune(args: argparse.Namespace) -> int:
        if _nnunet_folder(args.data):
            raise ValueError(
                f"{args.data}: nnU-Net preprocessed data serves pretraining only (its labels stay with "
                "nnU-Net); fine-tune in nnU-Net, or pass the raw dataset folder"
            )
        return run(args)

    return finetune


def _preprocess(run: Command) -> Command:
    def preprocess(args: argparse.Namespace) -> int:
        if not _nnunet_folder(args.src):
            return run(args)
        if args.spacing is not None or args.modality is not None:
            raise ValueError(
                f"{args.src}: nnU-Net's plans fix the spacing and normalisation of its data; "
                "drop --spacing / --modality"
            )
        from ..integrations.nnunet.preprocessed import convert_preprocessed

        print(f"nnU-Net data as a cache (same voxels): {convert_preprocessed(args.src, args.out)}")
        return 0

    return preprocess
