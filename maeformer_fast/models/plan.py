"""The per-step plan of an encoder pass: every stage's layout, window groupings and conv indices.

Built once when a step starts, from the batch size, the input size and (for the visible-only MAE
encoder) the visible unit ids; then passed down explicitly with the tokens (``Tokens.layout``), so
every block and conv of a stage shares one grouping and one neighbour table, and nothing in the
forward or backward pass sorts or builds an index again. The dense model gets the same object with
every position present, so dense fine-tuning and sparse pretraining keep one code path.

Nothing here scales with the dense volume on the sparse path: positions and tables are computed per
visible unit by integer arithmetic (``ops.sparse_conv.unit_neighbour_rows``), with a lookup over the
unit grid (one entry per mask unit) instead of the token grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.backend import resolve_conv_backend
from ..ops.masking import unit_corners
from ..ops.sparse_conv import halo_index, neighbour_table, transposed_table, unit_lookup
from ..types import Triple
from .config import NNFormerConfig
from .tokens import ConvPlan, Layout, UnitLayout, windows_from_grid

UNIT_STRIDE = (1, 1, 1)


@dataclass(eq=False)
class EncoderPlan:
    """Layouts of one encoder pass: ``input`` (the voxels the embedding reads) and one per stage."""

    input: Layout
    stages: list[Layout]


def plan_encoder(
    config: NNFormerConfig,
    batch_size: int,
    size: Triple,
    device: torch.device | str,
    visible_ids: Tensor | None = None,
) -> EncoderPlan:
    """Plan an encoder pass over (B, C, *size) inputs, a multiple of the total stride.

    Args:
        visible_ids: (B, K) flat visible unit ids (``ops.masking``) for the visible-only encoder, or
            None for the dense encoder.
    """
    device = torch.device(device)
    unit_grid = tuple(s // t for s, t in zip(size, config.total_stride))
    dense = visible_ids is None
    if dense:
        layout = Layout.dense_grid(batch_size, size, device)
        lookup = None
    else:
        batch, corner = unit_corners(visible_ids, unit_grid)
        layout = Layout.of_units(UnitLayout(batch, corner, config.total_stride), size, batch_size)
        lookup = unit_lookup(batch, corner, batch_size, unit_grid)
    # Padded window offsets wherever the Triton kernels run (no host sync on CUDA); exact elsewhere.
    pad_groups = True if config.attention_backend == "triton" else None
    from_grid = windows_from_grid(
        visible_ids is None, config.cyclic_windows, config.attention_backend, device
    )
    backend = resolve_conv_backend(config.conv_backend, device)
    first, second = config.embedding_strides
    plan = EncoderPlan(layout, [])
    for stride in (first, UNIT_STRIDE, second, UNIT_STRIDE):
        layout = _plan_conv(layout, stride, lookup, backend)
    for stage in range(config.num_stages):
        if stage > 0:
            stride = config.downsampling_strides[stage - 1]
            kernel, padding = config.downsampling_kernels[stage - 1], config.downsampling_paddings[stage - 1]
            odd_phase = tuple(k == 3 and p == 0 for k, p in zip(kernel, padding))
            layout = _plan_conv(layout, stride, lookup, backend, odd_phase)  # type: ignore[arg-type]
        if not from_grid:  # blocks that cut windows from the grid need no grouping
            layout.plan_windows(config.window_sizes[stage], pad_groups)
        plan.stages.append(layout)
    return plan


def _plan_conv(
    layout: Layout,
    stride: Triple,
    lookup: Tensor | None,
    backend: str,
    odd_phase: tuple[bool, bool, bool] = (False, False, False),
) -> Layout:
    """Add the plan of a conv with ``stride`` on ``layout`` (3x3x3 padding 1 for the sparse ops; on
    ``odd_phase`` axes stride 1 there, keeping odd positions: ``models.nnformer.TokenConv3d``);
    returns the output layout."""
    if stride in layout.convs:
        return layout.convs[stride].out
    # ceil for kernel 3 (or 1) with padding 1 (or 0); floor on odd-phase axes
    grid = tuple(g // 2 if odd else -(-g // s) for g, s, odd in zip(layout.grid, stride, odd_phase))
    units = layout.units
    if units is None:
        out = (
            layout
            if stride == UNIT_STRIDE
            else Layout.dense_grid(layout.batch_size, grid, layout.coords.device)
        )
        layout.convs[stride] = ConvPlan(out)
        return out
    out = (
        layout
        if stride == UNIT_STRIDE
        else Layout.of_units(units.downscaled(stride), grid, layout.batch_size)
    )
    num_inputs = layout.coords.shape[0]
    sparse_stride = tuple(1 if odd else s for s, odd in zip(stride, odd_phase))
    keep = _odd_positions(units.downscaled(sparse_stride), odd_phase) if any(odd_phase) else None
    if backend == "triton":
        table = neighbour_table(units.batch, units.corner, lookup, units.size, sparse_stride)
        transposed = transposed_table(table, num_inputs)
        layout.convs[stride] = ConvPlan(out, table=table, transposed=transposed, keep=keep)
    else:
        halo = halo_index(units.batch, units.corner, lookup, units.size, sparse_stride, num_inputs)
        layout.convs[stride] = ConvPlan(out, halo=halo, keep=keep)
    return out


def _odd_positions(units: UnitLayout, odd_phase: tuple[bool, bool, bool]) -> Tensor:
    """(T_out,) rows of the units' tokens (unit by unit, C order) at odd positions along the
    ``odd_phase`` axes: the tokens of the same units downscaled by 2 there (unit sizes even)."""
    if any(odd and size % 2 for odd, size in zip(odd_phase, units.size)):
        raise ValueError(f"an odd-phase conv needs an even unit size, got {units.size}")
    rows = torch.arange(units.batch.numel() * math.prod(units.size), device=units.batch.device)
    rows = rows.view(-1, *units.size)
    picks = tuple(slice(1, None, 2) if odd else slice(None) for odd in odd_phase)
    return rows[(slice(None), *picks)].reshape(-1)
