"""``maeformer preprocess`` and ``maeformer make-phantoms``: argparse subcommands for the main CLI."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(subparsers: Any) -> None:
    """Register ``preprocess`` and ``make-phantoms`` on an ``argparse`` subparsers object; each sets
    ``func`` (called with the parsed args, returns an exit code)."""
    p = subparsers.add_parser(
        "preprocess",
        help="build the preprocessed cache of a NIfTI dataset",
        description=(
            "Validate a dataset folder (Decathlon/nnU-Net layout with dataset.json, imagesTr, labelsTr, "
            "imagesTs; or a plain folder of .nii/.nii.gz volumes), then reorient to RAS, crop to nonzero, "
            "resample to the target spacing, normalise and write C-order .npy arrays plus per-case "
            "geometry JSON and plan.json to OUT. All bad cases are reported at once. Re-running skips "
            "cases whose sources and plan did not change and whose arrays are intact (damaged ones are "
            "rebuilt)."
        ),
    )
    p.add_argument("src", metavar="SRC", help="dataset folder")
    p.add_argument("out", metavar="OUT", help="cache folder to create or update")
    p.add_argument(
        "--spacing",
        type=_triple(float),
        default=None,
        metavar="Z,Y,X",
        help="target voxel spacing in mm, (z, y, x) order of the stored arrays "
        "(default: the dataset's median spacing)",
    )
    p.add_argument(
        "--modality",
        default=None,
        type=str.upper,
        choices=("CT", "MRI"),
        help="override the channel modality from dataset.json: CT (clip to foreground "
        "0.5/99.5 percentiles + dataset z-score) or MRI (per-volume z-score) (default: dataset.json's)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: number of cores, at most 8)"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad cases out with a warning (listed in plan.json) instead of failing",
    )
    p.set_defaults(func=_run_preprocess)

    m = subparsers.add_parser(
        "make-phantoms",
        help="write a generated phantom dataset (Decathlon layout)",
        description=(
            "Write synthetic MRI-like 3D volumes with textured, overlapping organ-like shapes, bias field "
            "and noise, labels in labelsTr and unlabeled extras in imagesTs, as a Decathlon-layout "
            "dataset. Deterministic per seed; the default data when you have none."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m.add_argument("out", metavar="OUT", help="folder to write the dataset to")
    m.add_argument("--labeled", type=int, default=24, help="number of labeled cases (imagesTr/labelsTr)")
    m.add_argument("--unlabeled", type=int, default=24, help="number of unlabeled cases (imagesTs)")
    m.add_argument(
        "--shape", type=_triple(int), default=(48, 64, 64), metavar="Z,Y,X", help="volume size in voxels"
    )
    m.add_argument("--classes", type=int, default=3, help="label classes including background (2-5)")
    m.add_argument("--seed", type=int, default=0, help="random seed")
    m.set_defaults(func=_run_phantoms)


def _triple(kind: type) -> Any:
    def parse(text: str) -> tuple:
        parts = text.replace("x", ",").split(",")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
        try:
            return tuple(kind(v) for v in parts)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _run_preprocess(args: argparse.Namespace) -> int:
    from ..data.preprocess import preprocess_dataset

    # Bad datasets raise DatasetError (a ValueError): the CLI reports it like every input error.
    out = preprocess_dataset(
        args.src,
        args.out,
        target_spacing=args.spacing,
        modality=args.modality,
        workers=args.workers,
        skip_bad=args.skip_bad,
    )
    print(f"preprocessed cache: {out}")
    return 0


def _run_phantoms(args: argparse.Namespace) -> int:
    from ..data.phantoms import make_phantoms

    out = make_phantoms(
        args.out,
        num_labeled=args.labeled,
        num_unlabeled=args.unlabeled,
        shape=args.shape,
        num_classes=args.classes,
        seed=args.seed,
    )
    print(f"phantom dataset: {out}")
    return 0
