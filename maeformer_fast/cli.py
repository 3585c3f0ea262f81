"""The ``maeformer`` command line: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_args import add_dataclass_arguments, dataclass_from_args

PRETRAIN_HELP = {
    "data": "raw dataset folder (Decathlon layout or a folder of NIfTI volumes) or a preprocessing cache",
    "out": "output folder: encoder.safetensors, checkpoints/, pretrain_log.csv, previews/",
    "model": "model config: small, synapse, acdc, tumor",
    "crop_size": "crop in voxels, a multiple of the mask unit (default: the model config's crop)",
    "mask_ratio": "share of mask units hidden from the encoder",
    "encoder": "sparse = visible tokens only (MAE); dense = SimMIM-style baseline with mask tokens",
    "steps": "optimizer steps of the whole run",
    "warmup_steps": "linear warmup steps (default 5%% of steps)",
    "lr": "peak AdamW learning rate",
    "norm_pix_loss": "normalise each unit's target voxels (MAE's norm_pix_loss)",
    "loader": "data loader backend: torch or dali",
    "precision": "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "resume": "continue from the newest checkpoint in OUT/checkpoints",
    "cache_dir": "where to build the preprocessing cache of a raw dataset",
    "progress": "show a progress bar",
    "deterministic": "use deterministic kernels so that a resumed run is bit-identical (a bit slower)",
}


def cmd_info(args: argparse.Namespace) -> int:
    from .info import environment_report

    report = environment_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train.pretrain import PretrainConfig, pretrain

    result = pretrain(dataclass_from_args(PretrainConfig, args))
    print(
        f"pretrained {result.steps} steps in {result.wall_time_s:.0f} s, final loss {result.final_loss:.4f}"
    )
    print(f"encoder weights: {result.encoder_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data import make_phantoms
    from .train.pretrain import PretrainConfig, pretrain

    out = Path(args.out)
    data = make_phantoms(out / "phantoms", seed=args.seed)
    print(f"generated phantom dataset: {data}")
    result = pretrain(PretrainConfig(data=str(data), out=str(out / "pretrain"), steps=args.pretrain_steps,
                                     seed=args.seed, checkpoint_every=args.pretrain_steps))  # fmt: skip
    print(f"pretrained {result.steps} steps in {result.wall_time_s:.0f} s: masked-unit loss "
          f"{result.losses[0]:.3f} -> {result.final_loss:.3f}; encoder: {result.encoder_path}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(
        prog="maeformer",
        description="Visible-token-only MAE pretraining and few-label fine-tuning of nnFormer.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print versions, devices and usable optional backends")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="the main job end to end on a generated phantom dataset (CPU-sized)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--pretrain-steps", type=int, default=60, help="pretraining steps (default: 60)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the runs (default: 0)")
    demo.set_defaults(func=cmd_demo)

    pre = sub.add_parser("pretrain", help="MAE pretraining of the nnFormer encoder on unlabeled volumes")
    add_dataclass_arguments(pre, PretrainConfig, PRETRAIN_HELP)
    pre.set_defaults(func=cmd_pretrain)

    from .data.commands import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
