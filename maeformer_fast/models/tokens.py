"""Packed tokens of one stage, the common currency of the dense model and the sparse MAE encoder, and
their layout: positions plus the window groupings and conv indices that the step's plan builds once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..ops.backend import resolve_backend
from ..ops.memo import memoised_when_eager
from ..ops.window_groups import window_groups
from ..types import Triple, as_triple


@dataclass
class WindowGrouping:
    """Tokens sorted by attention window.

    ``order`` (T,) sorts tokens by group, ``inverse`` (T,) undoes it, ``cu_seqlens`` (G + 1,) int32 gives
    group offsets and ``coords`` (T, 3) int32 are the sorted token positions the bias is computed from.
    """

    order: Tensor
    inverse: Tensor
    cu_seqlens: Tensor
    coords: Tensor


@dataclass(frozen=True)
class GridWindows:
    """Windows of a dense ``grid`` cut by ``ops.grid_windows``: ``window`` boxes rolled by ``shift``
    and, where windows wrap around or hold padding, the (nW, L, L) ``mask`` of pairs that attend."""

    grid: Triple
    window: Triple
    shift: Triple
    mask: Tensor | None


def stage_window(grid: Triple, window: Triple, shifted: bool) -> tuple[Triple, Triple]:
    """Window and shift actually used on a stage grid.

    Along an axis where the window covers the grid, the window becomes the grid and is not shifted
    (nnFormer's global attention at small grids); elsewhere a shifted block moves by half a window.
    """
    size = tuple(min(w, g) for w, g in zip(window, grid))
    shift = tuple(w // 2 if shifted and w < g else 0 for w, g in zip(window, grid))
    return size, shift  # type: ignore[return-value]


def windows_from_grid(dense: bool, cyclic: bool, backend: str, device: torch.device) -> bool:
    """Whether a block cuts its windows from the dense grid (``ops.grid_windows``) instead of
    grouping packed tokens: ACDC's cyclic windows always (dense only), and dense tokens whose
    attention runs on the torch backend (level with grouping or slightly faster on the CPU, and
    no sort in the plan: benchmarks/RESULTS.md)."""
    return cyclic or (dense and resolve_backend(backend, device) == "torch")


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


@dataclass(eq=False)
class ConvPlan:
    """What a 3x3x3 conv with one stride needs on one layout; built with the step's plan.

    ``out`` is the layout of the outputs (the input layout itself for stride 1). Sparse layouts carry
    one of the two index forms of ``ops.sparse_conv``: ``table`` (T_mid, 27) with its ``transposed``
    (T_in, 27) for the Triton kernels, or ``halo`` (N, Lz, Ly, Lx) for the CPU block form, and for
    a conv with odd-phase axes (``models.nnformer.TokenConv3d``, run at stride 1 there) ``keep``
    (T_out,), the rows of its T_mid outputs that are ``out``'s tokens. Dense layouts carry none of
    them (cuDNN / oneDNN convolve the grid).
    """

    out: Layout
    table: Tensor | None = None
    transposed: Tensor | None = None
    halo: Tensor | None = None
    keep: Tensor | None = None


@dataclass(eq=False)
class Layout:
    """Where one stage's tokens are, and the index structures its layers read, made once per step.

    Attributes:
        coords: (T, 3) int64 positions in the stage grid (z, y, x).
        batch: (T,) int64 batch index.
        grid: the stage grid size (Z, Y, X).
        batch_size: number of volumes B.
        units: the visible mask units for the sparse MAE encoder (tokens stored unit by unit, C order
            inside a unit), or None for a dense grid in (b, z, y, x) C order.
        groupings: window groupings by (window in effect, shift), filled by the plan.
        convs: conv plans by stride, filled by the plan.
    """

    coords: Tensor
    batch: Tensor
    grid: Triple
    batch_size: int
    units: UnitLayout | None = None
    groupings: dict[tuple[Triple, Triple], WindowGrouping] = field(default_factory=dict)
    convs: dict[Triple, ConvPlan] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.units is None

    @classmethod
    def dense_grid(cls, batch_size: int, grid: Triple, device: torch.device) -> Layout:
        """Every position of a (B, Z, Y, X) grid, C order."""
        coords, batch = dense_positions(batch_size, tuple(grid), device)
        return cls(coords, batch, tuple(grid), batch_size)

    @classmethod
    def of_units(cls, units: UnitLayout, grid: Triple, batch_size: int) -> Layout:
        """The tokens of the visible ``units`` on a stage ``grid``."""
        coords, batch = units.token_positions()
        return cls(coords, batch, tuple(grid), batch_size, units)

    def plan_windows(self, window: Triple, pad_groups: bool | None) -> None:
        """Group the tokens for ``window``, plain and shifted (what a stage's blocks use)."""
        for shifted in (False, True):
            key = stage_window(self.grid, as_triple(window), shifted)
            if key not in self.groupings:
                self.groupings[key] = self._group(*key, pad_groups)

    def grouping(self, window: Triple, shifted: bool) -> tuple[WindowGrouping, Triple]:
        """The grouping for a (possibly shifted) window and the window size in effect.

        A window the plan did not group for is grouped now and not kept (a sort each call: the
        reference code of the tests does this; the models only ask for planned windows).
        """
        key = stage_window(self.grid, as_triple(window), shifted)
        grouping = self.groupings.get(key)
        return (self._group(*key, None) if grouping is None else grouping), key[0]

    def conv(self, stride: Triple) -> ConvPlan:
        """The plan of a conv with ``stride`` reading this layout."""
        if stride not in self.convs:
            raise KeyError(f"no conv with stride {stride} planned on the {self.grid} grid")
        return self.convs[stride]

    def _group(self, size: Triple, shift: Triple, pad_groups: bool | None) -> WindowGrouping:
        order, cu_seqlens = window_groups(self.coords, self.batch, size, shift, pad_groups)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # int32 once here: the Triton kernels read int32 and would otherwise cast in every call.
        return WindowGrouping(order, inverse, cu_seqlens, self.coords[order].to(torch.int32))


@dataclass
class Tokens:
    """Token features of one stage for a batch of volumes, and their ``layout``.

    ``features`` is (T, C); for a dense layout it is a view of a (B, Z, Y, X, C) tensor.
    """

    features: Tensor
    layout: Layout

    @classmethod
    def from_grid(cls, x: Tensor, layout: Layout | None = None) -> Tokens:
        """Tokens from a (B, C, Z, Y, X) map: every position (``layout`` dense, or made here), or the
        positions of a sparse ``layout``."""
        if layout is None:
            layout = Layout.dense_grid(x.shape[0], tuple(x.shape[2:]), x.device)
        if layout.dense:
            return cls(grid_features(x), layout)
        coords = layout.coords
        return cls(x[layout.batch, :, coords[:, 0], coords[:, 1], coords[:, 2]], layout)  # [T, C]

    coords = property(lambda self: self.layout.coords)
    batch = property(lambda self: self.layout.batch)
    grid = property(lambda self: self.layout.grid)
    batch_size = property(lambda self: self.layout.batch_size)
    dense = property(lambda self: self.layout.dense)
    units = property(lambda self: self.layout.units)

    def with_features(self, features: Tensor) -> Tokens:
        """Same layout, new features (T, C')."""
        return Tokens(features, self.layout)

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
        """See :meth:`Layout.grouping`."""
        return self.layout.grouping(window, shifted)


def grid_features(x: Tensor) -> Tensor:
    """(B, C, Z, Y, X) -> (B*Z*Y*X, C) features in dense C order."""
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


@memoised_when_eager
def dense_positions(batch_size: int, grid: Triple, device: torch.device) -> tuple[Tensor, Tensor]:
    """Coordinates (B*Z*Y*X, 3) and batch indices (B*Z*Y*X,) of a dense grid in C order; memoised in
    eager mode, where every dense stage of every step asks for the same few grids."""
    axes = [torch.arange(n, device=device) for n in (batch_size, *grid)]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 4)
    return mesh[:, 1:].contiguous(), mesh[:, 0].contiguous()
