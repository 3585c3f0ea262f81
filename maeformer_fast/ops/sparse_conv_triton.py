"""Triton kernels of the sparse 3x3x3 convolution: implicit GEMMs over a neighbour table.

Layout: features (T_in, C_in) and outputs (T_out, C_out) row-major; ``table`` (T_out, 27) int32 holds
the input row each output reads at each kernel offset (-1: a zero neighbour); the weight is taken as
(27, C_in, C_out) (offset-major). See docs/kernels.md for the derivation.

- Forward: ``out[t] = sum_k x[table[t, k]] @ W_k + b``. A program owns BLOCK_M outputs x BLOCK_N
  output channels and loops over the 27 offsets and the input channels: each step gathers a
  (BLOCK_M, BLOCK_K) tile of input rows (masked loads give the zeros) straight into ``tl.dot``.
- Input gradient: ``dx[i] = sum_k dout[tableT[i, k]] @ W_k^T`` -- the same kernel over the transposed
  table (for one offset every output reads a different input, so each (i, k) has at most one output).
  A gather, not a scatter: no atomics, no sort, nothing accumulates into a shared zero row.
- Weight gradient: ``dW_k = x[table[:, k]]^T @ dout``, 27 gathered GEMMs. Programs own (offset,
  C_in block, C_out block) and a fixed slice of the outputs (split-K, so that a layer with few channels
  still fills the GPU); the slices' partial sums are added by one ``torch.sum`` in a fixed order, so
  the gradient is bit-reproducible.

int64 address arithmetic; channel blocks are at least 16 (``tl.dot``'s minimum) with masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

OFFSETS = 27
BLOCK_M = 64  # outputs per program (forward, input gradient)
BLOCK_T = 64  # outputs per step of the weight-gradient reduction


@triton.jit
def _gather_gemm_kernel(
    X,  # [T_in, C_in]
    TABLE,  # [T_out, 27] int32
    W,  # [27, C_in, C_out]
    BIAS,  # [C_out]
    OUT,  # [T_out, C_out]
    T_out,
    C_in,
    C_out,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T_out
    col_ok = cols < C_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(27):
        src = tl.load(TABLE + rows * 27 + k, mask=row_ok, other=-1).to(tl.int64)  # [BLOCK_M]
        src_ok = src >= 0
        for c0 in range(0, C_in, BLOCK_K):
            ch = c0 + tl.arange(0, BLOCK_K)
            ch_ok = ch < C_in
            a = tl.load(
                X + src[:, None] * C_in + ch[None, :], mask=src_ok[:, None] & ch_ok[None, :], other=0.0
            )
            b = tl.load(
                W + (k * C_in + ch[:, None]) * C_out + cols[None, :],
                mask=ch_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * C_out + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def _weight_grad_kernel(
    X,  # [T_in, C_in]
    TABLE,  # [T_out, 27] int32
    DOUT,  # [T_out, C_out]
    PARTIAL,  # [splits, 27, C_in, C_out] fp32
    T_out,
    C_in,
    C_out,
    rows_per_split,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Axis 0 enumerates (offset, C_in block, C_out block), C_out fastest; axis 1 the output slices.
    tile = tl.program_id(0)
    col_blocks = tl.cdiv(C_out, BLOCK_N)
    ch_blocks = tl.cdiv(C_in, BLOCK_K)
    k = tile // (ch_blocks * col_blocks)
    ch = ((tile // col_blocks) % ch_blocks).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = (tile % col_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    ch_ok = ch < C_in
    col_ok = cols < C_out
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, T_out)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = t < end
        src = tl.load(TABLE + t * 27 + k, mask=t_ok, other=-1).to(tl.int64)
        src_ok = src >= 0
        a = tl.load(X + src[None, :] * C_in + ch[:, None], mask=ch_ok[:, None] & src_ok[None, :], other=0.0)
        b = tl.load(
            DOUT + t[:, None] * C_out + cols[None, :], mask=t_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out = PARTIAL + ((split * 27 + k) * C_in + ch[:, None]) * C_out + cols[None, :]
    tl.store(out, acc, mask=ch_ok[:, None] & col_ok[None, :])


def _channel_block(channels: int, most: int) -> int:
    return min(most, max(16, triton.next_power_of_2(channels)))


def _precision(dtype: torch.dtype) -> str:
    # fp32 callers expect fp32 results: keep tensor cores out of fp32 dots (tf32 would cost ~1e-3).
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(features: Tensor, table: Tensor, weight: Tensor) -> None:
    if features.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton sparse conv supports fp32/bf16/fp16, got {features.dtype}")
    if weight.dtype != features.dtype:
        raise TypeError(f"features and weight must share a dtype, got {features.dtype} and {weight.dtype}")
    if weight.shape[1:] != (features.shape[1], 3, 3, 3):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {features.shape[1]} input channels")
    if table.dtype != torch.int32 or table.dim() != 2 or table.shape[1] != OFFSETS:
        raise ValueError(f"table must be (T_out, 27) int32, got {tuple(table.shape)} {table.dtype}")


def _gather_gemm(x: Tensor, table: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """sum_k x[table[:, k]] @ w[k] (+ bias): x (T_in, C_in), w (27, C_in, C_out) -> (T_out, C_out)."""
    num_out, (_, c_in, c_out) = table.shape[0], w.shape
    out = torch.empty(num_out, c_out, device=x.device, dtype=x.dtype)
    if num_out == 0:
        return out
    block_n = _channel_block(c_out, 64)
    grid = (triton.cdiv(num_out, BLOCK_M), triton.cdiv(c_out, block_n))
    _gather_gemm_kernel[grid](
        x, table, w, out if bias is None else bias, out, num_out, c_in, c_out,
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=_channel_block(c_in, 32),
        PRECISION=_precision(x.dtype), num_warps=4,
    )  # fmt: skip
    return out


def triton_sparse_conv(features: Tensor, table: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Forward launch: (T_out, C_out) in the features' dtype."""
    _check(features, table, weight)
    w = weight.permute(2, 3, 4, 1, 0).reshape(OFFSETS, weight.shape[1], weight.shape[0]).contiguous()
    return _gather_gemm(features.contiguous(), table.contiguous(), w, bias.contiguous())


def _num_splits(num_out: int, tiles: int, device: torch.device) -> int:
    """Output slices of the weight-gradient reduction: enough programs to fill the GPU a few times."""
    if device.type != "cuda":  # the interpreter runs one program at a time: a few slices test the sum
        return max(1, min(3, triton.cdiv(num_out, BLOCK_T)))
    wanted = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, tiles)
    return max(1, min(wanted, triton.cdiv(num_out, 4 * BLOCK_T)))


def triton_sparse_conv_backward(
    grad_out: Tensor, features: Tensor, table: Tensor, transposed: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward launches: gradients of features, weight and bias (the weight's dtype)."""
    c_out, c_in = weight.shape[:2]
    grad_out, features = grad_out.contiguous(), features.contiguous()
    wt = weight.permute(2, 3, 4, 0, 1).reshape(OFFSETS, c_out, c_in).contiguous()  # W_k^T
    dx = _gather_gemm(grad_out, transposed.contiguous(), wt, None)
    num_out = table.shape[0]
    block_k, block_n = _channel_block(c_in, 32), _channel_block(c_out, 64)
    tiles = OFFSETS * triton.cdiv(c_in, block_k) * triton.cdiv(c_out, block_n)
    splits = _num_splits(num_out, tiles, features.device)
    rows_per_split = triton.cdiv(triton.cdiv(max(num_out, 1), splits), BLOCK_T) * BLOCK_T
    partial = torch.zeros(splits, OFFSETS, c_in, c_out, device=features.device, dtype=torch.float32)
    if num_out > 0:
        _weight_grad_kernel[(tiles, splits)](
            features, table.contiguous(), grad_out, partial, num_out, c_in, c_out, rows_per_split,
            BLOCK_T=BLOCK_T, BLOCK_K=block_k, BLOCK_N=block_n, PRECISION=_precision(features.dtype),
            num_warps=4,
        )  # fmt: skip
    # A plain reduction over the slices: fixed order, bit-reproducible.
    dw = partial.sum(0).view(3, 3, 3, c_in, c_out).permute(4, 3, 0, 1, 2).contiguous().to(weight.dtype)
    db = grad_out.float().sum(0).to(weight.dtype)
    return dx, dw, db
