"""Memoising the small index tensors every step asks for again (grids, window masks, bias rows)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

Result = TypeVar("Result")


def memoised_when_eager(function: Callable[..., Result]) -> Callable[..., Result]:
    """``function`` (hashable arguments) memoised in eager mode, where every step asks for the same
    few results; traced afresh under torch.compile (a compiled graph holds no cache, and dynamo warns
    about one)."""
    memoised = functools.lru_cache(maxsize=64)(function)

    @functools.wraps(function)
    def call(*args: object) -> Result:
        return function(*args) if torch.compiler.is_compiling() else memoised(*args)

    return call
