"""Shared type aliases."""

from __future__ import annotations

from collections.abc import Sequence

Triple = tuple[int, int, int]


def as_triple(value: int | Sequence[int]) -> Triple:
    """Return ``value`` as a (z, y, x) triple of ints."""
    if isinstance(value, int):
        return (value, value, value)
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected an int or three ints, got {value!r}")
    return values  # type: ignore[return-value]
