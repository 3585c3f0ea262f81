"""The ``maeformer`` command line: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def cmd_info(args: argparse.Namespace) -> int:
    from .info import environment_report

    report = environment_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maeformer",
        description="Visible-token-only MAE pretraining and few-label fine-tuning of nnFormer.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print versions, devices and usable optional backends")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
