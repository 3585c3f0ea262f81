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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .window_groups import relative_position_index

BACKENDS = ("auto", "torch", "reference", "triton")


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
    """Pad groups to power-of-two lengths and run SDPA per length bucket.

    Padding keys are masked with -inf; padding queries are computed and dropped. Each group's
    bias is gathered as (H, L, L), so memory grows with the bucket length squared: fine for windows
    (at most prod(window) tokens), which is all this op is for.
    """
    num_tokens, num_heads, _ = q.shape
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = cu_seqlens[:-1].long()
    nonempty = lengths > 0
    lengths, starts = lengths[nonempty], starts[nonempty]
    if lengths.numel() == 0:
        return q.new_zeros(num_tokens, num_heads, v.shape[2])
    buckets = torch.pow(2, torch.ceil(torch.log2(lengths.double()))).long()
    token_ids, outputs = [], []
    for bucket in torch.unique(buckets).tolist():
        chosen = buckets == bucket
        group_len = lengths[chosen]
        slot = torch.arange(bucket, device=q.device)
        valid = slot[None, :] < group_len[:, None]  # [n, L]
        pos = starts[chosen][:, None] + torch.where(valid, slot[None, :], 0)  # [n, L]
        c = coords[pos]  # [n, L, 3]
        rows = relative_position_index(c[:, :, None, :] - c[:, None, :, :], window_size)  # [n, L, L]
        bias = bias_table[rows].permute(0, 3, 1, 2).to(q.dtype)  # [n, H, L, L]
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(
            q[pos].transpose(1, 2), k[pos].transpose(1, 2), v[pos].transpose(1, 2), attn_mask=bias, scale=scale
        )  # [n, H, L, D]
        outputs.append(out.transpose(1, 2)[valid])
        token_ids.append(pos[valid])
    inverse = torch.empty(num_tokens, dtype=torch.long, device=q.device)
    order = torch.cat(token_ids)
    inverse[order] = torch.arange(order.numel(), device=q.device)
    return torch.cat(outputs)[inverse]


def triton_available() -> bool:
    """Whether the Triton backend can run here (CUDA, or CPU with TRITON_INTERPRET=1)."""
    try:
        from . import window_attention_triton  # noqa: F401
    except ImportError:
        return False
    return True


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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k, v must be (T, H, D) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_available() else "torch"
    if backend == "reference":
        return window_attention_reference(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
    if backend == "triton":
        from .window_attention_triton import window_attention_triton

        return window_attention_triton(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
    return window_attention_torch(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
