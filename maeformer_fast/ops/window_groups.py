"""Grouping packed 3D tokens into (shifted) attention windows, and the relative position index.

A stage's tokens are packed rows: integer coordinates ``coords`` (T, 3) in the stage grid (z, y, x)
and a batch index ``batch`` (T,). Dense grids are the special case where every position is present.

Swin's shifted windows (cyclic roll by -s, then a mask that separates wrapped tokens) partition the
*unrolled* grid into windows that start at offset -(w - s): the window of a token along one axis is
``floor((coord + w - s) / w)``. Grouping by that index needs neither roll nor mask, gives partial
windows at both edges, and works unchanged when only some tokens are present (MAE visible tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..types import as_triple


def window_groups(
    coords: Tensor,
    batch: Tensor,
    window_size: int | Sequence[int],
    shift: int | Sequence[int],
    pad_groups: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Sort tokens by (batch, window) and return the group boundaries.

    Args:
        coords: (T, 3) integer token positions in the stage grid.
        batch: (T,) integer batch index of every token.
        window_size: window extent per axis (w).
        shift: shift per axis (s, 0 <= s < w); 0 gives plain windows.
        pad_groups: return T + 1 offsets (the G real groups followed by empty ones) instead of G + 1.
            Counting the groups needs a device-to-host sync; padded offsets do not, which keeps a
            GPU step asynchronous. Default: padded on CUDA, exact elsewhere.

    Returns:
        order: (T,) int64 permutation that sorts tokens by group (stable: the input order is kept
            inside a group).
        cu_seqlens: (G + 1,) int32 offsets of the G non-empty groups in the sorted order, or (T + 1,)
            with trailing empty groups when padded.
    """
    window, shifts = as_triple(window_size), as_triple(shift)
    if any(not 0 <= s < w for s, w in zip(shifts, window)):  # checked on ints: no device sync
        raise ValueError(f"shift {shifts} must lie in [0, window) for window {window}")
    device = coords.device
    if coords.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(
            1, dtype=torch.int32, device=device
        )
    # Python-int arithmetic per axis: no small host-to-device copies on the hot path.
    cell = [
        torch.div(coords[:, a].long() + (w - s), w, rounding_mode="floor")
        for a, (w, s) in enumerate(zip(window, shifts))
    ]  # 3 x [T], >= 0 for coords >= 0
    extent = [c.amax() + 1 for c in cell]
    key = ((batch.long() * extent[0] + cell[0]) * extent[1] + cell[1]) * extent[2] + cell[2]
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    if pad_groups if pad_groups is not None else device.type == "cuda":
        starts = torch.ones_like(sorted_key, dtype=torch.bool)
        starts[1:] = sorted_key[1:] != sorted_key[:-1]
        group = torch.cumsum(starts, 0) - 1  # [T] group of each sorted token, 0..G-1
        bounds = torch.arange(coords.shape[0] + 1, device=device)
        return order, torch.searchsorted(group, bounds).to(torch.int32)  # tokens in groups < g
    _, counts = torch.unique_consecutive(sorted_key, return_counts=True)
    cu_seqlens = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(counts, 0)
    return order, cu_seqlens


def relative_position_index(delta: Tensor, window_size: int | Sequence[int]) -> Tensor:
    """Row of the bias table for coordinate differences ``delta`` (..., 3), each in [-(w-1), w-1].

    Every axis offset is shifted by w - 1 and the three are flattened in C order, which maps the
    (2wz-1)(2wy-1)(2wx-1) possible offsets one to one onto the table rows.
    """
    wz, wy, wx = as_triple(window_size)
    delta = delta.long()
    return (
        (delta[..., 0] + wz - 1) * ((2 * wy - 1) * (2 * wx - 1))
        + (delta[..., 1] + wy - 1) * (2 * wx - 1)
        + (delta[..., 2] + wx - 1)
    )


def bias_table_size(window_size: int | Sequence[int]) -> int:
    """Number of distinct relative offsets (rows of the bias table) for a window."""
    wz, wy, wx = as_triple(window_size)
    return (2 * wz - 1) * (2 * wy - 1) * (2 * wx - 1)


def official_to_correct_rows(window_size: int | Sequence[int]) -> Tensor:
    """For each correct table row, the row the official nnFormer formula reads for the same offset.

    The official code flattens offsets with multipliers (3wy - 1, 2wy - 1, 1), which sends several
    offsets to one row (their issues #8 and #46). Gathering an official table with this index gives
    the equivalent table in the correct layout, so loaded official weights behave exactly as upstream.
    """
    wz, wy, wx = as_triple(window_size)
    offsets = torch.stack(
        torch.meshgrid(
            torch.arange(-(wz - 1), wz),
            torch.arange(-(wy - 1), wy),
            torch.arange(-(wx - 1), wx),
            indexing="ij",
        ),
        dim=-1,
    ).reshape(-1, 3)
    return (
        (offsets[:, 0] + wz - 1) * (3 * wy - 1)
        + (offsets[:, 1] + wy - 1) * (2 * wy - 1)
        + offsets[:, 2]
        + wx
        - 1
    )
