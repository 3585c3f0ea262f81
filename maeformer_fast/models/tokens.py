"""Packed tokens of one stage: the common currency of the dense model and the sparse MAE encoder."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..ops.window_groups import Triple, as_triple, window_groups


@dataclass
class WindowGrouping:
    """Tokens sorted by attention window.

    ``order`` (T,) sorts tokens by group, ``inverse`` (T,) undoes it, ``cu_seqlens`` (G + 1,) gives
    group offsets and ``coords`` (T, 3) are the sorted token positions the bias is computed from.
    """

    order: Tensor
    inverse: Tensor
    cu_seqlens: Tensor
    coords: Tensor


def stage_window(grid: Triple, window: Triple, shifted: bool) -> tuple[Triple, Triple]:
    """Window and shift actually used on a stage grid.

    Along an axis where the window covers the grid, the window becomes the grid and is not shifted
    (nnFormer's global attention at small grids); elsewhere a shifted block moves by half a window.
    """
    size = tuple(min(w, g) for w, g in zip(window, grid))
    shift = tuple(w // 2 if shifted and w < g else 0 for w, g in zip(window, grid))
    return size, shift  # type: ignore[return-value]


@dataclass(frozen=True)
class UnitLayout:
    """Visible mask units of a sparse stage.

    Attributes:
        batch: (N,) batch index of every visible unit.
        corner: (N, 3) unit coordinates (z, y, x) in the unit grid.
        size: tokens per unit per axis at this stage.
    """

    batch: Tensor
    corner: Tensor
    size: Triple

    def downscaled(self, stride: Triple) -> UnitLayout:
        """The same units after a strided layer."""
        return UnitLayout(self.batch, self.corner, tuple(u // s for u, s in zip(self.size, stride)))

    def starts(self) -> Tensor:
        """(N, 3) position of every unit's first token at this stage (corner times size)."""
        # Per-axis Python ints: a size tensor made from host data would be a host-to-device copy,
        # which on CUDA waits for every queued kernel.
        return torch.stack([self.corner[:, axis] * size for axis, size in enumerate(self.size)], dim=1)

    def token_positions(self) -> tuple[Tensor, Tensor]:
        """Coordinates (N*prod(size), 3) and batch (N*prod(size),) of the units' tokens, unit by unit."""
        local, _ = dense_positions(1, self.size, self.corner.device)  # [U, 3]
        coords = (self.starts()[:, None, :] + local[None]).reshape(-1, 3)
        return coords, self.batch.repeat_interleave(local.shape[0])


@dataclass
class Tokens:
    """Tokens of one stage for a batch of volumes.

    Attributes:
        features: (T, C) token features.
        coords: (T, 3) int64 positions in the stage grid (z, y, x).
        batch: (T,) int64 batch index.
        grid: the stage grid size (Z, Y, X) the positions live in.
        batch_size: number of volumes B.
        dense: True when every grid position of every volume is present, in (b, z, y, x) C order;
            then ``features`` is a view of a (B, Z, Y, X, C) tensor.
        units: for the sparse MAE encoder, the visible mask units; tokens are then stored unit by
            unit, C order inside a unit.
    """

    features: Tensor
    coords: Tensor
    batch: Tensor
    grid: Triple
    batch_size: int
    dense: bool
    units: UnitLayout | None = None
    _groupings: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_grid(cls, x: Tensor) -> Tokens:
        """Dense tokens from a (B, C, Z, Y, X) feature map."""
        b, c, z, y, xx = x.shape
        features = x.permute(0, 2, 3, 4, 1).reshape(-1, c)
        coords, batch = dense_positions(b, (z, y, xx), x.device)
        return cls(features, coords, batch, (z, y, xx), b, dense=True)

    @classmethod
    def from_units(cls, x: Tensor, units: UnitLayout) -> Tokens:
        """Sparse tokens: the positions of the visible ``units`` read from a (B, C, Z, Y, X) map."""
        coords, batch = units.token_positions()
        features = x[batch, :, coords[:, 0], coords[:, 1], coords[:, 2]]  # [T, C]
        return cls(features, coords, batch, tuple(x.shape[2:]), x.shape[0], dense=False, units=units)

    @classmethod
    def from_unit_features(cls, features: Tensor, units: UnitLayout, grid: Triple, batch_size: int) -> Tokens:
        """Sparse tokens from features (N*prod(units.size), C) stored unit by unit."""
        coords, batch = units.token_positions()
        return cls(features, coords, batch, grid, batch_size, dense=False, units=units)

    def with_features(self, features: Tensor) -> Tokens:
        """Same positions (and cached groupings), new features (T, C')."""
        return Tokens(
            features,
            self.coords,
            self.batch,
            self.grid,
            self.batch_size,
            self.dense,
            self.units,
            self._groupings,
        )

    def to_grid(self) -> Tensor:
        """(B, C, Z, Y, X) feature map; absent positions are zero."""
        c = self.features.shape[1]
        if self.dense:
            return self.features.reshape(self.batch_size, *self.grid, c).permute(0, 4, 1, 2, 3)
        grid = self.features.new_zeros(self.batch_size, *self.grid, c)
        grid = grid.index_put(
            (self.batch, self.coords[:, 0], self.coords[:, 1], self.coords[:, 2]), self.features
        )
        return grid.permute(0, 4, 1, 2, 3)

    def grouping(self, window: Triple, shifted: bool) -> tuple[WindowGrouping, Triple]:
        """Window grouping for a (possibly shifted) window on this stage's grid, cached per window.

        Returns the grouping and the window size in effect (smaller than ``window`` where the grid is).
        """
        size, shift = stage_window(self.grid, as_triple(window), shifted)
        key = (size, shift)
        if key not in self._groupings:
            order, cu_seqlens = window_groups(self.coords, self.batch, size, shift)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            self._groupings[key] = WindowGrouping(order, inverse, cu_seqlens, self.coords[order])
        return self._groupings[key], size


@functools.lru_cache(maxsize=64)
def dense_positions(batch_size: int, grid: Triple, device: torch.device) -> tuple[Tensor, Tensor]:
    """Coordinates (B*Z*Y*X, 3) and batch indices (B*Z*Y*X,) of a dense grid in C order.

    Memoised because every dense stage of every step asks for the same few grids.
    """
    axes = [torch.arange(n, device=device) for n in (batch_size, *grid)]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 4)
    return mesh[:, 1:].contiguous(), mesh[:, 0].contiguous()
