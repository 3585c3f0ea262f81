"""Command-line options generated from the config dataclasses, so the CLI and the API never drift."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, helps: dict[str, str], skip: tuple[str, ...] = ()
) -> None:
    """One option per field of ``cls`` (positional-free): ``--crop-size Z Y X``, ``--resume/--no-resume``.

    Required fields (no default) become required options; dict fields and ``skip`` are left out.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional or args else hint
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        text = helps.get(f.name, "")
        kwargs: dict[str, Any] = {
            "dest": f.name,
            # A help text that explains its default itself (e.g. "default: OUT") keeps its own words.
            "help": f"{text} (default: {default})" if has_default and "(default:" not in text else text,
        }
        if not has_default:
            kwargs["required"] = True
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        elif typing.get_origin(base) is tuple:
            kwargs.update(
                nargs=len(typing.get_args(base)), type=int, default=default, metavar=("Z", "Y", "X")
            )
        elif base in (int, float, str):
            kwargs.update(type=base, default=default)
        else:  # dicts and other structured fields are for the Python API only
            continue
        parser.add_argument(_option(f.name), **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the parsed options that belong to it (tuples restored), plus ``extra``."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **extra})
