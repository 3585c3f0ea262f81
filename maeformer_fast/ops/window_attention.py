"""Varlen window attention over packed groups of 3D tokens with a relative position bias.

Query i attends to every key j of its own group with the logit
``scale * <q_i, k_j> + bias_table[relative_position_index(coords_i - coords_j), h]``.
Groups are contiguous runs of the (already sorted) tokens delimited by ``cu_seqlens``, like
FlashAttention's varlen interface; see :func:`maeformer_fast.ops.window_groups`.

Backends:
- ``"reference"``: a loop over groups in fp32; obviously right, slow. The oracle of the tests.
- ``"torch"``: groups padded to power-of-two buckets and run through
  ``scaled_dot_product_attention`` with the gathered bias; the CPU path.
- ``"triton"``: fused kernels (``window_attention_triton``); CUDA, or CPU under TRITON_INTERPRET=1.
- ``"auto"``: triton on CUDA tensors, torch otherwise.

FLOPs: ``torch.utils.flop_counter`` sees the torch backend's matmuls; the custom ops below carry
registered formulas that count the same matmuls (:func:`attention_flops`), so a counted step is alike on
every backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..types import as_triple
from .backend import resolve_backend
from .window_groups import relative_position_index


def window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: int | Sequence[int],
    scale: float,
) -> Tensor:
    """Loop over groups, explicit softmax in fp32. Shapes as :func:`varlen_window_attention`."""
    bounds = cu_seqlens.tolist()
    outputs = [q.new_zeros(0, q.shape[1], v.shape[2])]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        c = coords[start:end]
        rows = relative_position_index(c[:, None, :] - c[None, :, :], window_size)  # [n, n]
        bias = bias_table.float()[rows].permute(2, 0, 1)  # [H, n, n]
        logits = torch.einsum("ihd,jhd->hij", q[start:end].float(), k[start:end].float()) * scale + bias
        probs = logits.softmax(dim=-1)
        outputs.append(torch.einsum("hij,jhd->ihd", probs, v[start:end].float()).to(q.dtype))
    return torch.cat(outputs)


def _pieces(
    coords: Tensor, cu_seqlens: Tensor, window_size: int | Sequence[int]
) -> list[tuple[Tensor, Tensor | None, Tensor]]:
    """Split the non-empty groups into batches of equal padded length for batched attention.

    Returns (pos, valid, rows) triples: pos (n, L) token index of every slot (padding slots repeat
    the group's first token so gathers stay in bounds); valid (n, L) marks real slots, or None when
    all are real; rows are the bias-table rows, (L, L) when shared by all n groups or (n, L, L).

    Full windows whose tokens come in window raster order (every interior window of a dense grid, and
    of MAE-visible units that hold whole windows) share one (L, L) row matrix: their bias is gathered
    once and broadcast, which is what makes this path cheaper than per-window formulations. The other
    groups are padded to power-of-two lengths and gather their bias per pair.
    """
    wz, wy, wx = as_triple(window_size)
    volume = wz * wy * wx
    device = cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = cu_seqlens[:-1].long()
    nonempty = lengths > 0
    lengths, starts = lengths[nonempty], starts[nonempty]
    if lengths.numel() == 0:
        return []
    pieces = []
    canonical = torch.zeros_like(lengths, dtype=torch.bool)
    full = (lengths == volume).nonzero().flatten()
    if full.numel() > 0:
        cells = torch.arange(volume, device=device)
        pos = starts[full][:, None] + cells  # [n, W]
        local = coords[pos].long()
        local = local - local.amin(1, keepdim=True)
        raster = (local[..., 0] * wy + local[..., 1]) * wx + local[..., 2]
        in_order = (raster == cells).all(1)
        canonical[full[in_order]] = True
        if bool(in_order.any()):
            rows = _bias_rows(coords[pos[in_order][0]], window_size)  # the same for every such window
            pieces.append((pos[in_order], None, rows))
    rest = ~canonical
    lengths, starts = lengths[rest], starts[rest]
    if lengths.numel() == 0:
        return pieces
    buckets = torch.pow(2, torch.ceil(torch.log2(lengths.double()))).long()
    for bucket in torch.unique(buckets).tolist():
        chosen = buckets == bucket
        slot = torch.arange(bucket, device=device)
        valid = slot[None, :] < lengths[chosen][:, None]  # [n, L]
        pos = starts[chosen][:, None] + torch.where(valid, slot[None, :], 0)
        pieces.append((pos, valid, _bias_rows(coords[pos], window_size)))
    return pieces


def _bias_rows(c: Tensor, window_size: int | Sequence[int]) -> Tensor:
    """Table rows (..., L, L) for the pairwise differences of coordinates c (..., L, 3)."""
    return relative_position_index(c[..., :, None, :] - c[..., None, :, :], window_size)


def _piece_bias(bias_table: Tensor, valid: Tensor | None, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention bias, (H, L, L) shared or (n, H, L, L), -inf on padding keys."""
    bias = bias_table[rows].movedim(-1, -3).to(dtype)
    if valid is not None:
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
    return bias


def window_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: int | Sequence[int],
    scale: float,
) -> Tensor:
    """Batch groups of equal (padded) length and attend per batch (:func:`_pieces`,
    :func:`attend_with_bias`).

    Padding keys are masked with -inf; padding queries are computed and dropped. A batch's bias is at
    most (n, H, L, L), L <= prod(window): fine for windows, which is all this op is for.
    """
    num_tokens, num_heads, _ = q.shape
    token_ids, outputs = [], []
    for pos, valid, rows in _pieces(coords, cu_seqlens, window_size):
        out = attend_with_bias(
            _gather(q, pos).transpose(1, 2),
            _gather(k, pos).transpose(1, 2),
            _gather(v, pos).transpose(1, 2),
            _piece_bias(bias_table, valid, rows, q.dtype),
            scale,
        ).transpose(1, 2)  # [n, L, H, D]
        outputs.append(out.flatten(0, 1) if valid is None else out[valid])
        token_ids.append(pos.flatten() if valid is None else pos[valid])
    out = q.new_zeros(num_tokens, num_heads, v.shape[2])
    if not outputs:
        return out
    return out.index_copy(0, torch.cat(token_ids), torch.cat(outputs))


def attend_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(scale q k^T + bias) v over (n, H, L, D), bias (H, L, L) shared or (n, H, L, L).

    Every query must have at least one key with a finite bias. The shared bias goes to SDPA expanded to
    4D (a stride-0 view, no copy): torch 2.13's CPU kernel takes that ~3x faster than the 3D mask and
    1.5x faster than an explicit matmul + softmax for windows of 64 tokens (forward; forward + backward
    level; 2 cores, `benchmarks/RESULTS.md`). Where autograd records the attention on the CPU in fp32
    (the grid path of dense blocks in training), SDPA falls back to its math path, whose softmax adds a
    check for all-masked rows that costs as much as the softmax itself; the explicit form here is that
    path's arithmetic (q and k each scaled by sqrt(scale)), bit for bit, without the check.
    """
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    if recorded and q.device.type == "cpu" and q.dtype == torch.float32:
        root = math.sqrt(scale)
        return ((q * root) @ (k * root).transpose(-1, -2) + bias).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[0], -1, -1, -1), scale=scale)


def _gather(x: Tensor, pos: Tensor) -> Tensor:
    """x[pos] for x (T, ...) and pos (n, L); a view when pos is one contiguous run (the dense case),
    which also spares the scatter-add that a gather costs in backward."""
    first = int(pos[0, 0])
    if bool((pos.flatten() == torch.arange(first, first + pos.numel(), device=pos.device)).all()):
        return x[first : first + pos.numel()].view(*pos.shape, *x.shape[1:])
    return x[pos]


def window_attention_torch_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: int | Sequence[int],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Explicit gradients of :func:`window_attention_torch` (the custom op cannot run autograd inside).

    Per batch of groups, in fp32: P = softmax(S), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)),
    dQ = scale dS K, dK = scale dS^T Q, and the table gradient sums dS over the pairs of each row.
    Returns dq, dk, dv (input dtypes) and the table gradient (table dtype).
    """
    num_heads = q.shape[1]
    dq = torch.zeros_like(q, dtype=torch.float32)
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    dtable = torch.zeros_like(bias_table, dtype=torch.float32)
    for pos, valid, rows in _pieces(coords, cu_seqlens, window_size):
        mask = torch.ones_like(pos, dtype=torch.bool) if valid is None else valid  # [n, L]
        qb, kb, vb = (t[pos].transpose(1, 2).float() for t in (q, k, v))  # [n, H, L, D]
        bias = _piece_bias(bias_table, valid, rows, torch.float32)
        probs = (qb @ kb.transpose(-1, -2) * scale + bias).softmax(-1)
        # Padding query slots repeat a real token: give them no cotangent so they add nothing.
        go = grad_out[pos].transpose(1, 2).float() * mask[:, None, :, None]
        dp = go @ vb.transpose(-1, -2)
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))  # [n, H, L, L]
        real = pos[mask]
        dq[real] = (ds @ kb * scale).transpose(1, 2)[mask]
        dk[real] = (ds.transpose(-1, -2) @ qb * scale).transpose(1, 2)[mask]
        dv[real] = (probs.transpose(-1, -2) @ go).transpose(1, 2)[mask]
        if valid is None:  # shared rows: sum the groups first
            dtable.index_add_(0, rows.flatten(), ds.sum(0).permute(1, 2, 0).reshape(-1, num_heads))
        else:
            pair = valid[:, :, None] & valid[:, None, :]  # [n, L, L]
            dtable.index_add_(0, rows[pair], ds.permute(0, 2, 3, 1)[pair])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtable.to(bias_table.dtype)


# Custom ops: torch.compile cannot trace the torch backend (its bucket sizes depend on data) nor the
# Triton launches, so both hide behind opaque ops with fake implementations (shapes only) and an
# autograd formula. Eager calls skip the ops: the torch backend then keeps its autograd graph instead
# of recomputing the forward in backward, and the Triton backend runs its autograd.Function, whose
# host-side ops a dispatch mode can see (the test that no step waits for the device relies on that).
# Eager Triton calls take the op only while a FLOP counter listens (:func:`_flops_counted`): the
# counter cannot see kernel launches, only the op and its formula.
@torch.library.custom_op("maeformer::varlen_window_attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: list[int],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns out (T, H, D) and, for the triton backend, the base-2 log-sum-exp (T, H) (else empty)."""
    if backend == "triton":
        from .window_attention_triton import triton_forward

        return triton_forward(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
    out = window_attention_torch(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
    return out, q.new_empty(0, dtype=torch.float32)


@_attention_op.register_fake
def _attention_op_fake(q, k, v, coords, cu_seqlens, bias_table, window_size, scale, backend):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse_shape = (q.shape[0], q.shape[1]) if backend == "triton" else (0,)
    return out, q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("maeformer::varlen_window_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: list[int],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v and bias_table."""
    if backend == "triton":
        from .window_attention_triton import triton_backward

        return triton_backward(
            grad_out, q, k, v, out, lse, coords, cu_seqlens, bias_table, window_size, scale
        )
    return window_attention_torch_backward(
        grad_out, q, k, v, coords, cu_seqlens, bias_table, window_size, scale
    )


@_attention_backward_op.register_fake
def _attention_backward_op_fake(
    grad_out, q, k, v, out, lse, coords, cu_seqlens, bias_table, window_size, scale, backend
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias_table)


def _attention_op_setup_context(ctx, inputs, output):
    q, k, v, coords, cu_seqlens, bias_table, window_size, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, coords, cu_seqlens, bias_table)
    ctx.window_size, ctx.scale, ctx.backend = window_size, scale, backend


def _attention_op_backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward only; nothing downstream differentiates it.
    q, k, v, out, lse, coords, cu_seqlens, bias_table = ctx.saved_tensors
    dq, dk, dv, dbias = _attention_backward_op(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        coords,
        cu_seqlens,
        bias_table,
        ctx.window_size,
        ctx.scale,
        ctx.backend,
    )
    return dq, dk, dv, None, None, dbias, None, None, None


_attention_op.register_autograd(_attention_op_backward, setup_context=_attention_op_setup_context)


def counted_pairs(coords: Tensor, cu_seqlens: Tensor, window_size: int | Sequence[int]) -> int:
    """Query-key pairs the torch backend multiplies: sum of n L^2 over its batches (:func:`_pieces`),
    padding of the power-of-two buckets included, so the counts of both backends agree exactly.

    Fake tensors (what inductor hands a formula when it estimates a node's cost) carry no group sizes:
    then every token is taken to sit in a full window, which is exact for dense grids.
    """
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(coords) or is_fake(cu_seqlens) or coords.device.type == "meta":
        return coords.shape[0] * math.prod(as_triple(window_size))
    return sum(pos.shape[0] * pos.shape[1] ** 2 for pos, _, _ in _pieces(coords, cu_seqlens, window_size))


def attention_flops(pairs: int, num_heads: int, head_dim: int, value_dim: int, backward: bool = False) -> int:
    """FLOPs of window attention over ``pairs`` query-key pairs per head, as FlopCounterMode counts the
    torch backend's training path (two matmuls in forward: 2 D per pair for Q K^T, 2 D_v for P V;
    autograd's backward runs two matmuls per forward matmul: dQ and dK, dP and dV). Softmax, bias and
    scaling are elementwise and not counted, as FlopCounterMode counts none of them."""
    forward = 2 * pairs * num_heads * (head_dim + value_dim)
    return 2 * forward if backward else forward


@register_flop_formula(torch.ops.maeformer.varlen_window_attention, get_raw=True)
def _attention_op_flops(
    q, k, v, coords, cu_seqlens, bias_table, window_size, scale, backend, *args, out_val=None, **kwargs
) -> int:
    pairs = counted_pairs(coords, cu_seqlens, window_size)
    return attention_flops(pairs, q.shape[1], q.shape[2], v.shape[2])


@register_flop_formula(torch.ops.maeformer.varlen_window_attention_backward, get_raw=True)
def _attention_backward_op_flops(
    grad_out, q, k, v, out, lse, coords, cu_seqlens, bias_table, window_size, scale, backend, *args,
    out_val=None, **kwargs,
) -> int:  # fmt: skip
    # The forward's recomputation (the kernels' and the torch backward op's) is not counted: the torch
    # backend's autograd keeps the probabilities instead, and every backend must count alike.
    pairs = counted_pairs(coords, cu_seqlens, window_size)
    return attention_flops(pairs, q.shape[1], q.shape[2], v.shape[2], backward=True)


def _flops_counted() -> bool:
    """Whether a ``torch.utils.flop_counter.FlopCounterMode`` is active (it pushes a private
    ``_FlopCounterMode`` on the dispatch-mode stack; earlier torch versions pushed the counter itself)."""
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    kinds = (
        flop_counter.FlopCounterMode,
        getattr(flop_counter, "_FlopCounterMode", flop_counter.FlopCounterMode),
    )
    return any(isinstance(mode, kinds) for mode in _get_current_dispatch_mode_stack())


def window_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: int | Sequence[int],
    scale: float,
    backend: str,
) -> Tensor:
    """The custom-op route (what torch.compile sees) for backend "torch" or "triton"."""
    out, _ = _attention_op(
        q, k, v, coords, cu_seqlens, bias_table, list(as_triple(window_size)), scale, backend
    )
    return out


def varlen_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: int | Sequence[int],
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention inside packed groups with an in-window relative position bias.

    Args:
        q, k, v: (T, H, D) tokens already sorted by group.
        coords: (T, 3) integer positions of the tokens (same order), used for the bias.
        cu_seqlens: (G + 1,) int group offsets; empty groups are allowed.
        bias_table: ((2wz-1)(2wy-1)(2wx-1), H) relative position bias.
        window_size: the window the table was built for; every in-group offset must lie in
            [-(w-1), w-1] per axis.
        scale: logit scale, 1/sqrt(D) by default.
        backend: "auto", "torch", "reference" or "triton".

    Returns:
        (T, H, D) attention output in the same order as q.
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k, v must be (T, H, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        return window_attention_reference(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
    if torch.compiler.is_compiling() or (backend == "triton" and _flops_counted()):
        return window_attention_op(q, k, v, coords, cu_seqlens, bias_table, window_size, scale, backend)
    if backend == "triton":
        from .window_attention_triton import window_attention_triton

        return window_attention_triton(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
    return window_attention_torch(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
