"""3x3x3 convolutions over the visible mask units only (block form with a one-token halo).

Every visible unit is convolved as a small dense block: its tokens plus a one-token halo are read
through an index grid that holds only the visible tokens (zero elsewhere), then convolved with
padding 0. Masked and out-of-volume neighbours therefore count as zero, exactly as in a dense
convolution of the masked grid, and no masked output position is computed. On CPU this measured
3-5x faster than the dense masked conv for 8x8x8-token units at 25% visible (brief, section 3), and
faster than gathering 27 neighbours per token, because each unit is one well-shaped conv call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .window_groups import Triple


def padded_token_lookup(coords: Tensor, batch: Tensor, batch_size: int, grid: Triple, pad: int = 1) -> Tensor:
    """Int grid (B, Z+2p, Y+2p, X+2p): the row of each present token, T (a zero row) elsewhere.

    Reading halos through this one-channel index instead of a zero-filled C-channel grid avoids
    filling and scattering a dense feature grid per layer; the gather's backward then adds straight
    into the token features.
    """
    z, y, x = grid
    num_tokens = coords.shape[0]
    lookup = torch.full((batch_size, z + 2 * pad, y + 2 * pad, x + 2 * pad), num_tokens, dtype=torch.long,
                        device=coords.device)  # fmt: skip
    lookup[batch, coords[:, 0] + pad, coords[:, 1] + pad, coords[:, 2] + pad] = torch.arange(
        num_tokens, device=coords.device
    )
    return lookup


def unit_block_conv3d(
    features: Tensor,
    coords: Tensor,
    batch: Tensor,
    batch_size: int,
    grid: Triple,
    unit_batch: Tensor,
    unit_start: Tensor,
    unit_size: Triple,
    weight: Tensor,
    bias: Tensor | None,
    stride: Triple,
) -> Tensor:
    """Conv3d(kernel 3, padding 1, ``stride``) evaluated at the output positions of visible units.

    Args:
        features: (T, C_in) visible tokens; coords (T, 3) and batch (T,) their positions.
        grid: the input grid size (Z, Y, X).
        unit_batch: (N,) batch index of each visible unit.
        unit_start: (N, 3) first input token of each unit (unit corner * unit_size).
        unit_size: input tokens per unit per axis, each a multiple of the stride.
        weight: (C_out, C_in, 3, 3, 3); bias (C_out,) or None.

    Returns:
        (N * prod(unit_size // stride), C_out) outputs, unit by unit, C order inside a unit.
    """
    out_size = [u // s for u, s in zip(unit_size, stride)]
    lookup = padded_token_lookup(coords, batch, batch_size, grid)  # [B, Z+2, Y+2, X+2]
    rows = torch.cat([features, features.new_zeros(1, features.shape[1])])  # [T + 1, C], last row zero
    # Output o of a unit reads inputs s*o - 1 .. s*o + 1, i.e. s*(n-1)+3 inputs from start - 1,
    # which is ``start`` in the padded grid.
    axes = [
        unit_start[:, a, None] + torch.arange(s * (n - 1) + 3, device=features.device)
        for a, (s, n) in enumerate(zip(stride, out_size))
    ]  # 3 x [N, L_a]
    index = (unit_batch[:, None, None, None], axes[0][:, :, None, None], axes[1][:, None, :, None],
             axes[2][:, None, None, :])  # fmt: skip
    blocks = rows[lookup[index]]  # [N, Lz, Ly, Lx, C]
    out = F.conv3d(blocks.permute(0, 4, 1, 2, 3), weight, bias, stride=stride)  # [N, C_out, nz, ny, nx]
    return out.permute(0, 2, 3, 4, 1).reshape(-1, weight.shape[0])
