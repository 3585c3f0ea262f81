"""3x3x3 convolutions (padding 1, any stride) over the visible mask units only.

Tokens of a sparse stage are stored unit by unit (C order inside a unit, see ``models.plan``). A
masked or out-of-volume neighbour counts as zero, exactly as in a dense convolution of the masked
grid, and no masked output position is computed. Two forms, both driven by integer tables that the
per-step plan builds once (:func:`unit_neighbour_rows` does the arithmetic, with no dense grid):

- ``neighbour_table`` (T_out, 27) int32: the input row read by every output for every kernel offset,
  -1 for a zero neighbour. The Triton kernels (``sparse_conv_triton``) use it as an implicit GEMM:
  gathered tiles straight into ``tl.dot``, the input gradient as the same kernel over the transposed
  table, the weight gradient as split gathered GEMMs; no halo is materialised, nothing scatters into
  a shared row, nothing sorts. The CUDA path.
- ``halo_index`` (N, Lz, Ly, Lx): each visible unit's input block plus a one-token halo. The block is
  gathered (on CUDA with ``F.embedding``, whose backward skips the padding row, where ``rows[index]``
  would accumulate every zero neighbour into one row) and convolved densely with padding 0. On CPU this
  measured 3-5x faster than the dense masked conv for 8x8x8-token units at 25% visible (brief,
  section 3), and faster than gathering 27 neighbours per token. The CPU path.

FLOPs: ``torch.utils.flop_counter`` counts the CPU path's ``F.conv3d``; the Triton custom ops carry
registered formulas (:func:`sparse_conv_flops`) that count the same, so a counted step is alike on both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..types import Triple

KERNEL_OFFSETS = 27  # 3 x 3 x 3, offsets in C order (dz, dy, dx)


def _split(index: Tensor, size: Triple) -> Tensor:
    """Flat C-order indices (M,) over ``size`` -> (M, 3) coordinates."""
    _, sy, sx = size
    return torch.stack([index // (sy * sx), (index // sx) % sy, index % sx], dim=1)


def unit_lookup(unit_batch: Tensor, unit_corner: Tensor, batch_size: int, unit_grid: Triple) -> Tensor:
    """(B, uz, uy, ux) int64: the storage index n of every visible unit, -1 where a unit is masked.

    The size of the unit grid, not of the volume: a few hundred entries per sample at most.
    """
    lookup = torch.full((batch_size, *unit_grid), -1, dtype=torch.long, device=unit_corner.device)
    lookup[unit_batch, unit_corner[:, 0], unit_corner[:, 1], unit_corner[:, 2]] = torch.arange(
        unit_batch.numel(), device=unit_corner.device
    )
    return lookup


def unit_neighbour_rows(
    unit_batch: Tensor, unit_corner: Tensor, lookup: Tensor, unit_size: Triple, local: Tensor
) -> Tensor:
    """Input rows at positions ``local`` relative to every visible unit's first token.

    Args:
        unit_batch, unit_corner: (N,) and (N, 3) the visible units, in storage order.
        lookup: (B, uz, uy, ux) from :func:`unit_lookup`.
        unit_size: tokens per unit per axis at the input stage.
        local: (M, 3) int64 positions in [-1, unit_size] per axis (a one-token halo at most).

    Returns:
        (N, M) int64: ``n' * prod(unit_size) + C-order position inside unit n'`` of the token there, or
        -1 where that unit is masked or outside the volume.
    """
    # Per axis: which neighbouring unit (-1, 0, +1) and where inside it. Python-int sizes only, so
    # nothing here is a host-to-device copy on CUDA.
    shift = torch.stack(
        [torch.div(local[:, a], s, rounding_mode="floor") for a, s in enumerate(unit_size)], 1
    )
    inside = [local[:, a] - shift[:, a] * s for a, s in enumerate(unit_size)]
    _, uy, ux = unit_size
    offset = (inside[0] * uy + inside[1]) * ux + inside[2]  # [M]
    corner = unit_corner[:, None, :] + shift[None]  # [N, M, 3]
    grid = lookup.shape[1:]
    in_volume = torch.ones(corner.shape[:2], dtype=torch.bool, device=local.device)
    for axis, extent in enumerate(grid):
        in_volume &= (corner[..., axis] >= 0) & (corner[..., axis] < extent)
    corner = corner.clamp(min=0)
    for axis, extent in enumerate(grid):
        corner[..., axis] = corner[..., axis].clamp(max=extent - 1)
    unit = lookup[unit_batch[:, None], corner[..., 0], corner[..., 1], corner[..., 2]]  # [N, M]
    tokens_per_unit = unit_size[0] * unit_size[1] * unit_size[2]
    return torch.where(in_volume & (unit >= 0), unit * tokens_per_unit + offset, -1)


def _kernel_offsets(device: torch.device) -> Tensor:
    """(27, 3) kernel offsets (dz, dy, dx) in {0, 1, 2}, C order: the weight's (3, 3, 3) layout."""
    return _split(torch.arange(KERNEL_OFFSETS, device=device), (3, 3, 3))


def neighbour_table(
    unit_batch: Tensor, unit_corner: Tensor, lookup: Tensor, unit_size: Triple, stride: Triple
) -> Tensor:
    """(N * prod(unit_size // stride), 27) int32: input row of every output and kernel offset, or -1.

    Output o of a unit (local position, C order) reads input ``stride * o + d - 1`` for offset d.
    """
    out_unit = tuple(u // s for u, s in zip(unit_size, stride))
    device = unit_corner.device
    out_local = _split(torch.arange(out_unit[0] * out_unit[1] * out_unit[2], device=device), out_unit)
    d = _kernel_offsets(device)
    local = torch.stack([out_local[:, None, a] * s + d[None, :, a] - 1 for a, s in enumerate(stride)], -1)
    rows = unit_neighbour_rows(unit_batch, unit_corner, lookup, unit_size, local.reshape(-1, 3))
    return rows.view(-1, KERNEL_OFFSETS).to(torch.int32)


def transposed_table(table: Tensor, num_inputs: int) -> Tensor:
    """(num_inputs, 27) int32: for input i and offset k, the output t with ``table[t, k] == i``, or -1.

    For a fixed offset the outputs read pairwise different inputs, so every (i, k) has at most one
    output and the scatter below writes each real slot once; absent neighbours all go to one spare
    row that is cut off.
    """
    num_outputs = table.shape[0]
    offset = torch.arange(KERNEL_OFFSETS, device=table.device)
    slot = torch.where(
        table >= 0, table.long() * KERNEL_OFFSETS + offset, num_inputs * KERNEL_OFFSETS + offset
    )
    flat = torch.full(((num_inputs + 1) * KERNEL_OFFSETS,), -1, dtype=torch.int32, device=table.device)
    outputs = torch.arange(num_outputs, device=table.device, dtype=torch.int32)
    flat[slot.flatten()] = outputs.repeat_interleave(KERNEL_OFFSETS)
    return flat.view(num_inputs + 1, KERNEL_OFFSETS)[:num_inputs]


def halo_index(
    unit_batch: Tensor,
    unit_corner: Tensor,
    lookup: Tensor,
    unit_size: Triple,
    stride: Triple,
    num_inputs: int,
) -> Tensor:
    """(N, Lz, Ly, Lx) int64: every unit's input block with a one-token halo, ``num_inputs`` (the zero
    row) where the token is masked or outside the volume. L = stride * (outputs per unit - 1) + 3."""
    extent = tuple(s * (u // s - 1) + 3 for u, s in zip(unit_size, stride))
    device = unit_corner.device
    local = _split(torch.arange(extent[0] * extent[1] * extent[2], device=device), extent) - 1
    rows = unit_neighbour_rows(unit_batch, unit_corner, lookup, unit_size, local)
    return torch.where(rows >= 0, rows, num_inputs).view(-1, *extent)


def unit_block_conv3d(
    features: Tensor, halo: Tensor, weight: Tensor, bias: Tensor | None, stride: Triple
) -> Tensor:
    """The CPU form: gather each unit's halo block, convolve it densely with padding 0.

    Args:
        features: (T, C_in) input tokens, unit by unit.
        halo: (N, Lz, Ly, Lx) from :func:`halo_index` (T marks a zero neighbour).
        weight: (C_out, C_in, 3, 3, 3); bias (C_out,) or None.

    Returns:
        (N * prod(unit outputs), C_out), unit by unit, C order inside a unit.
    """
    rows = torch.cat([features, features.new_zeros(1, features.shape[1])])  # [T + 1, C], last row zero
    # CUDA's index backward sorts and walks the many reads of the zero row serially; the embedding's
    # backward skips its padding row. On the CPU the plain gather measured 10-15% faster on the
    # first-stage layers (benchmarks/RESULTS.md).
    embed = functools.partial(F.embedding, padding_idx=features.shape[0])
    blocks = embed(halo, rows) if features.is_cuda else rows[halo]  # [N, Lz, Ly, Lx, C]
    out = F.conv3d(blocks.permute(0, 4, 1, 2, 3), weight, bias, stride=stride)  # [N, C_out, nz, ny, nx]
    return out.permute(0, 2, 3, 4, 1).reshape(-1, weight.shape[0])


def sparse_conv3d_reference(features: Tensor, table: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Gather 27 neighbours per output and one GEMM, in PyTorch: (T_out, C_out). Used by the tests."""
    rows = torch.cat([features, features.new_zeros(1, features.shape[1])])
    gathered = rows[torch.where(table >= 0, table.long(), features.shape[0])]  # [T_out, 27, C_in]
    w = weight.permute(2, 3, 4, 1, 0).reshape(KERNEL_OFFSETS * weight.shape[1], weight.shape[0])
    out = gathered.flatten(1) @ w
    return out if bias is None else out + bias


# The Triton path as custom ops: opaque to torch.compile (fakes give the shapes), one autograd formula.
@torch.library.custom_op("maeformer::sparse_conv3d", mutates_args=())
def _sparse_conv_op(
    features: Tensor, table: Tensor, transposed: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    """(T_out, C_out) = sum over offsets k of features[table[:, k]] @ W_k + bias."""
    from .sparse_conv_triton import triton_sparse_conv

    return triton_sparse_conv(features, table, weight, bias)


@_sparse_conv_op.register_fake
def _sparse_conv_op_fake(features, table, transposed, weight, bias):
    return features.new_empty(table.shape[0], weight.shape[0])


@torch.library.custom_op("maeformer::sparse_conv3d_backward", mutates_args=())
def _sparse_conv_backward_op(
    grad_out: Tensor, features: Tensor, table: Tensor, transposed: Tensor, weight: Tensor, input_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of features ((0, C_in) unless ``input_grad``), weight and bias."""
    from .sparse_conv_triton import triton_sparse_conv_backward

    # Without an input gradient (the first conv, which reads the images) the input-gradient GEMM runs
    # over an empty transposed table: no launch, as the CPU path's conv backward skips it too.
    return triton_sparse_conv_backward(
        grad_out, features, table, transposed if input_grad else transposed[:0], weight
    )


@_sparse_conv_backward_op.register_fake
def _sparse_conv_backward_op_fake(grad_out, features, table, transposed, weight, input_grad):
    dx = torch.empty_like(features) if input_grad else features.new_empty(0, features.shape[1])
    return dx, torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    features, table, transposed, weight, bias = inputs
    ctx.save_for_backward(features, table, transposed, weight)


def _backward(ctx, grad_out):
    features, table, transposed, weight = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    dx, dw, db = _sparse_conv_backward_op(
        grad_out.contiguous(), features, table, transposed, weight, input_grad
    )
    return dx if input_grad else None, None, None, dw, db


_sparse_conv_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_conv_flops(num_outputs: int, in_channels: int, out_channels: int) -> int:
    """FLOPs of one 3x3x3 sparse conv pass (forward, or one of the input and weight gradients) with
    ``num_outputs`` outputs, as FlopCounterMode counts the CPU path's dense conv of the halo blocks
    (2 x outputs x C_out x C_in x 27; zero neighbours and padding taps of kernel-1 axes included, the
    bias not)."""
    return 2 * num_outputs * KERNEL_OFFSETS * in_channels * out_channels


@register_flop_formula(torch.ops.maeformer.sparse_conv3d, get_raw=True)
def _sparse_conv_op_flops(features, table, transposed, weight, bias, *args, out_val=None, **kwargs) -> int:
    return sparse_conv_flops(table.shape[0], weight.shape[1], weight.shape[0])


@register_flop_formula(torch.ops.maeformer.sparse_conv3d_backward, get_raw=True)
def _sparse_conv_backward_op_flops(
    grad_out, features, table, transposed, weight, input_grad, *args, out_val=None, **kwargs
) -> int:
    # The weight gradient always; the input gradient when asked for (as conv backward's output mask).
    passes = 2 if input_grad else 1
    return passes * sparse_conv_flops(table.shape[0], weight.shape[1], weight.shape[0])


def sparse_conv3d(
    features: Tensor, table: Tensor, transposed: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """Fused sparse 3x3x3 conv (Triton): CUDA, or CPU under ``TRITON_INTERPRET=1``.

    Args:
        features: (T_in, C_in) input tokens; fp32, fp16 or bf16 (under autocast: the autocast dtype).
        table: (T_out, 27) int32 from :func:`neighbour_table`; transposed: (T_in, 27) int32 from
            :func:`transposed_table` (the input gradient's table).
        weight: (C_out, C_in, 3, 3, 3); bias (C_out,) or None.

    Returns:
        (T_out, C_out) in the compute dtype; differentiable in features, weight and bias.
    """
    device = features.device.type
    if torch.is_autocast_enabled(device):
        # A custom op is invisible to autocast: cast as autocast would for a convolution.
        dtype = torch.get_autocast_dtype(device)
        features, weight = features.to(dtype), weight.to(dtype)
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.to(weight.dtype)
    return _sparse_conv_op(features.contiguous(), table, transposed, weight, bias)
