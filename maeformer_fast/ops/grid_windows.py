"""Attention windows cut straight from a dense (B, Z, Y, X, C) grid: Swin's pad, roll and partition.

On a dense grid every window is a box, so windows come from views, one roll and one permute instead
of the gathers that sort packed tokens by group (``window_groups``). A shifted window that wraps
around the grid's end, and the zero padding up to a multiple of the window, are separated by a mask:
two positions may attend to each other only when they share a window of the *unrolled* grid (cell
``floor((c + w - s) / w)`` per axis, exactly the grouping of ``window_groups``), padding only with
padding. So the result equals the grouped path's on any grid size, partial windows included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..types import Triple
from .memo import memoised_when_eager
from .window_groups import relative_position_index


def padded_counts(grid: Triple, window: Triple) -> tuple[Triple, Triple]:
    """(padding at the far end, windows) per axis for a ``grid`` cut into ``window`` boxes."""
    pads = tuple((-g) % w for g, w in zip(grid, window))
    counts = tuple((g + p) // w for g, p, w in zip(grid, pads, window))
    return pads, counts  # type: ignore[return-value]


def to_windows(x: Tensor, window: Triple, shift: Triple) -> Tensor:
    """(B, Z, Y, X, C) -> (B, nW, L, C): zero-padded at the far end to a multiple of ``window``,
    rolled by ``-shift``, windows in C order, L = prod(window) positions per window in C order."""
    b, c = x.shape[0], x.shape[-1]
    pads, counts = padded_counts(tuple(x.shape[1:4]), window)
    if any(pads):
        x = torch.nn.functional.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    if any(shift):
        x = torch.roll(x, [-s for s in shift], (1, 2, 3))
    x = x.view(b, counts[0], window[0], counts[1], window[1], counts[2], window[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, math.prod(counts), math.prod(window), c)


def from_windows(x: Tensor, grid: Triple, window: Triple, shift: Triple) -> Tensor:
    """Inverse of :func:`to_windows`: (B, nW, L, C) -> (B, *grid, C), padding dropped."""
    b, c = x.shape[0], x.shape[-1]
    pads, counts = padded_counts(grid, window)
    x = x.view(b, *counts, *window, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(b, *(n * w for n, w in zip(counts, window)), c)
    if any(shift):
        x = torch.roll(x, list(shift), (1, 2, 3))
    return x[:, : grid[0], : grid[1], : grid[2]] if any(pads) else x


@memoised_when_eager
def window_rows(window: Triple, table_window: Triple, device: torch.device) -> Tensor:
    """(L, L) rows of a bias table made for ``table_window`` for the offsets between the positions
    of a ``window`` (C order; at most ``table_window``, smaller where a stage's grid clips it).
    Memoised in eager mode: every block of every step asks for it."""
    axes = [torch.arange(w, device=device) for w in window]
    local = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (L, 3)
    return relative_position_index(local[:, None] - local[None], table_window)


def window_mask(grid: Triple, window: Triple, shift: Triple, device: torch.device) -> Tensor | None:
    """(nW, L, L) bool, True where query i may attend key j of a window of :func:`to_windows`; None
    when every window is one whole window of the grid (no shift, no padding).

    Memoised in eager mode (every step asks for the same few), traced afresh under torch.compile.
    """
    if not any(shift) and not any((-g) % w for g, w in zip(grid, window)):
        return None
    return _window_mask(grid, window, shift, device)


@memoised_when_eager
def _window_mask(grid: Triple, window: Triple, shift: Triple, device: torch.device) -> Tensor:
    # Per position its unrolled cell + 1 on each axis, cut into windows like the features: the zero
    # padding that to_windows adds then reads as cell 0 on every axis, which no real position has.
    cells = [torch.div(torch.arange(g, device=device) + w - s, w, rounding_mode="floor") + 1
             for g, w, s in zip(grid, window, shift)]  # fmt: skip
    labels = to_windows(torch.stack(torch.meshgrid(*cells, indexing="ij"), dim=-1)[None], window, shift)[0]
    return (labels[:, :, None, :] == labels[:, None, :, :]).all(-1)  # (nW, L, L)
