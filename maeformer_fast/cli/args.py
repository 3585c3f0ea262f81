"""Command-line options generated from the config dataclasses, so the CLI and the API never drift."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, helps: dict[str, str], skip: tuple[str, ...] = ()
) -> None:
    """One option per field of ``cls`` (positional-free): ``--crop-size Z Y X``, ``--resume/--no-resume``.

    Required fields (no default) become required options; dict fields take a JSON object; ``skip``
    and other structured fields are left out.
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
        elif base is dict:  # e.g. --model-overrides '{"depths": [2, 2, 2]}'
            kwargs.update(type=json_object, default=None, metavar="JSON")
            kwargs["help"] = text
        else:  # other structured fields are for the Python API only
            continue
        parser.add_argument(_option(f.name), **kwargs)


def json_object(text: str) -> dict:
    """A JSON object given on the command line; anything else is an argparse error that says so."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg} at character {error.pos}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object ({{...}}) is needed, got: {text}")
    return value


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the parsed options that belong to it (tuples restored), plus ``extra``; an
    unset dict option keeps the field's default."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is None and f.default_factory is not dataclasses.MISSING:
                continue
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **extra})
