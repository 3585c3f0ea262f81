"""Fused Triton kernels for varlen 3D window attention with an in-kernel relative position bias.

Layout: q, k, v, out are (T, H, D) contiguous and sorted by group; ``cu_seqlens`` (G + 1) delimits the
groups; ``coords`` (T, 3) are the tokens' integer positions; ``bias_table`` is (R, H) with
R = (2wz-1)(2wy-1)(2wx-1). Query i attends to the keys j of its own group with the logit
``scale * <q_i, k_j> + bias_table[row(c_i - c_j), h]`` (see ``window_groups.relative_position_index``).

Tiling (see docs/kernels.md for the derivations):

- Tokens are cut into fixed blocks of BLOCK_M queries regardless of group boundaries; a block's keys are
  the union of its queries' groups, a contiguous range ``[cu[seg(first)], cu[seg(last) + 1])``, and a
  same-group mask (group ids compared) keeps attention inside groups. Many small groups therefore share
  one program, and a group of thousands of tokens is simply many blocks with a long key loop.
- The bias row is computed from coordinate differences and gathered from the table (a few KiB, cache
  resident); the (H, N, N) bias is never materialised.
- Forward: online softmax in base 2, saves only the log-sum-exp (base 2) per (token, head).
- Backward: ``delta = rowsum(dO * O)``, one kernel for dK, dV and the bias-table gradient (programs own
  key blocks and loop over the query blocks of their groups), one kernel for dQ (programs own query
  blocks). Nothing uses atomics, so every gradient is bit-reproducible.
- Bias-table gradient: each program owns a private partial table in global memory. For one key, the
  queries of its group sit at distinct positions, so their table rows are distinct: adding one key's
  column of dS into the table is a conflict-free gather-add-scatter. Keys are added one at a time with a
  barrier in between (rows repeat across keys); the partial tables are then summed in a fixed order.

int64 address arithmetic throughout (T * H * D can exceed 2**31); head dims are padded to a power of
two >= 16 (tl.dot's minimum) with masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..types import as_triple

LOG2E = 1.4426950408889634

# Query / key block sizes. 64 x 32 keeps the (BLOCK_M, BLOCK_N) score tile and the (BLOCK_M, D<=64)
# accumulator in registers with 4 warps, and fits the visible-window sizes (0-64 tokens) of stage 0.
BLOCK_M = 64
BLOCK_N = 32
# dK/dV programs own BLOCK_N_BWD keys; each key is one serial step of the bias-gradient scatter, so a
# smaller block keeps that loop short while the matmuls still use BLOCK_M queries.
BLOCK_N_BWD = 16


@triton.jit
def _bias_rows(dz, dy, dx, WZ, WY, WX):
    """Table row and in-window flag for coordinate differences (query - key), any broadcast shape."""
    rz = dz + (WZ - 1)
    ry = dy + (WY - 1)
    rx = dx + (WX - 1)
    inside = (rz >= 0) & (rz < 2 * WZ - 1) & (ry >= 0) & (ry < 2 * WY - 1) & (rx >= 0) & (rx < 2 * WX - 1)
    row = (rz * (2 * WY - 1) + ry) * (2 * WX - 1) + rx
    return row, inside


@triton.jit
def _load_coords(COORDS, idx, ok):
    """(z, y, x) positions of tokens ``idx`` (int64), 0 where not ``ok``."""
    z = tl.load(COORDS + idx * 3, mask=ok, other=0)
    y = tl.load(COORDS + idx * 3 + 1, mask=ok, other=0)
    x = tl.load(COORDS + idx * 3 + 2, mask=ok, other=0)
    return z, y, x


@triton.jit
def _group_span(CU, SEG, first, T, BLOCK):
    """Token range [lo, hi) of the groups that tokens first .. first + BLOCK - 1 belong to: the only
    partners those tokens can have."""
    last = tl.minimum(first + BLOCK, T) - 1
    lo = tl.load(CU + tl.load(SEG + first))
    hi = tl.load(CU + tl.load(SEG + last) + 1)
    return lo, hi


@triton.jit
def _bias_tile(BIAS, H, h, dz, dy, dx, same, WZ, WY, WX):
    """fp32 bias of head h for coordinate differences (query - key) of a tile, 0 for pairs not in one
    group; also the table rows and the mask of pairs that read one."""
    row, inside = _bias_rows(dz, dy, dx, WZ, WY, WX)
    used = same & inside
    bias = tl.load(BIAS + row.to(tl.int64) * H + h, mask=used, other=0.0).to(tl.float32)
    return bias, row, used


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    COORDS,
    SEG,
    CU,
    BIAS,
    T,
    H,
    D,
    scale_log2,
    WZ,
    WY,
    WX,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    rows = offs_m.to(tl.int64)
    n_lo, n_hi = _group_span(CU, SEG, pid * BLOCK_M, T, BLOCK_M)

    q = tl.load(
        Q + (rows[:, None] * H + h) * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
    )
    seg_q = tl.load(SEG + offs_m, mask=m_ok, other=-1)  # -1 never equals a key's group
    qz, qy, qx = _load_coords(COORDS, rows, m_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        cols = offs_n.to(tl.int64)
        kv_off = (cols[:, None] * H + h) * D + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        seg_k = tl.load(SEG + offs_n, mask=n_ok, other=-2)
        kz, ky, kx = _load_coords(COORDS, cols, n_ok)
        same = seg_q[:, None] == seg_k[None, :]  # [BLOCK_M, BLOCK_N]
        bias, _, _ = _bias_tile(
            BIAS, H, h, qz[:, None] - kz[None, :], qy[:, None] - ky[None, :], qx[:, None] - kx[None, :],
            same, WZ, WY, WX,
        )  # fmt: skip

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + bias * 1.4426950408889634
        s = tl.where(same, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key of their group yet keep m = -inf; subtract 0 there to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Every real query sees at least itself, so l_i > 0 there; padding rows are not stored.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + (rows[:, None] * H + h) * D + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + rows * H + h, m_i + tl.log2(l_safe), mask=m_ok)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    COORDS,
    SEG,
    CU,
    BIAS,
    T,
    H,
    D,
    scale,
    scale_log2,
    WZ,
    WY,
    WX,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    rows = offs_m.to(tl.int64)
    n_lo, n_hi = _group_span(CU, SEG, pid * BLOCK_M, T, BLOCK_M)

    qo_off = (rows[:, None] * H + h) * D + offs_d[None, :]
    qo_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + qo_off, mask=qo_ok, other=0.0)
    do = tl.load(DO + qo_off, mask=qo_ok, other=0.0)
    lse = tl.load(LSE + rows * H + h, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + rows * H + h, mask=m_ok, other=0.0)
    seg_q = tl.load(SEG + offs_m, mask=m_ok, other=-1)
    qz, qy, qx = _load_coords(COORDS, rows, m_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        cols = offs_n.to(tl.int64)
        kv_off = (cols[:, None] * H + h) * D + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        seg_k = tl.load(SEG + offs_n, mask=n_ok, other=-2)
        kz, ky, kx = _load_coords(COORDS, cols, n_ok)
        same = seg_q[:, None] == seg_k[None, :]
        bias, _, _ = _bias_tile(
            BIAS, H, h, qz[:, None] - kz[None, :], qy[:, None] - ky[None, :], qx[:, None] - kx[None, :],
            same, WZ, WY, WX,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + bias * 1.4426950408889634
        p = tl.where(same, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N], the softmax itself
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # d loss / d logit
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + qo_off, (dq * scale).to(DQ.dtype.element_ty), mask=qo_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    COORDS,
    SEG,
    CU,
    BIAS,
    DBIAS_PARTIAL,
    T,
    H,
    D,
    R,
    num_key_blocks,
    num_programs,
    scale,
    scale_log2,
    WZ,
    WY,
    WX,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    key_index = tl.arange(0, BLOCK_N)
    # This program's private partial bias-gradient table, (R,) for head h.
    table = DBIAS_PARTIAL + (pid.to(tl.int64) * H + h) * R
    # Persistent loop: a fixed number of programs per head bounds the partial tables' memory; the
    # key blocks a program visits, and so the summation order, depend only on the shapes.
    for kb in range(pid, num_key_blocks, num_programs):
        offs_n = kb * BLOCK_N + key_index
        n_ok = offs_n < T
        cols = offs_n.to(tl.int64)
        kv_off = (cols[:, None] * H + h) * D + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        seg_k = tl.load(SEG + offs_n, mask=n_ok, other=-2)
        kz, ky, kx = _load_coords(COORDS, cols, n_ok)
        m_lo, m_hi = _group_span(CU, SEG, kb * BLOCK_N, T, BLOCK_N)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < m_hi
            rows = offs_m.to(tl.int64)
            qo_off = (rows[:, None] * H + h) * D + offs_d[None, :]
            qo_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + qo_off, mask=qo_ok, other=0.0)  # [BLOCK_M, BLOCK_D]
            do = tl.load(DO + qo_off, mask=qo_ok, other=0.0)
            lse = tl.load(LSE + rows * H + h, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + rows * H + h, mask=m_ok, other=0.0)
            seg_q = tl.load(SEG + offs_m, mask=m_ok, other=-1)
            qz, qy, qx = _load_coords(COORDS, rows, m_ok)

            # Transposed tiles, [BLOCK_N, BLOCK_M]: keys along rows so dK, dV accumulate by plain dots.
            same_t = seg_k[:, None] == seg_q[None, :]
            bias_t, row_t, used_t = _bias_tile(
                BIAS, H, h, qz[None, :] - kz[:, None], qy[None, :] - ky[:, None], qx[None, :] - kx[:, None],
                same_t, WZ, WY, WX,
            )  # fmt: skip
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2 + bias_t * 1.4426950408889634
            p_t = tl.where(same_t, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

            # Bias gradient: one key (row of ds_t) at a time. Its queries are distinct positions of one
            # group, so their table rows are distinct and the gather-add-scatter below has no conflicts.
            for j in range(BLOCK_N):
                pick = key_index == j
                ds_j = tl.sum(tl.where(pick[:, None], ds_t, 0.0), 0)  # [BLOCK_M]
                row_j = tl.sum(tl.where(pick[:, None], row_t, 0), 0)
                ok_j = tl.sum(tl.where(pick[:, None], used_t.to(tl.int32), 0), 0) > 0
                old = tl.load(table + row_j, mask=ok_j, other=0.0)
                tl.store(table + row_j, old + ds_j, mask=ok_j)
                # The next key may hit the same rows from other threads: make the stores visible.
                tl.debug_barrier()

        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 callers expect fp32 results: keep tensor cores out of fp32 dots (tf32 would cost ~1e-3).
    return "ieee" if dtype == torch.float32 else "tf32"


def _group_ids(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """(T,) int32 group index of every token; empty groups are skipped naturally."""
    positions = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.int32)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True).to(torch.int32)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, bias_table: Tensor) -> None:
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton window attention supports fp32/bf16/fp16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.shape != q.shape:
        raise ValueError(f"the triton backend needs v of q's shape, got {tuple(v.shape)} vs {tuple(q.shape)}")
    if not 1 <= q.shape[-1] <= 128:
        raise ValueError(f"head dim must be in 1..128, got {q.shape[-1]}")
    if bias_table.dim() != 2 or bias_table.shape[1] != q.shape[1]:
        raise ValueError(f"bias_table must be (R, {q.shape[1]}), got {tuple(bias_table.shape)}")


def triton_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: Sequence[int],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward launch. Returns out (T, H, D) in q's dtype and the base-2 log-sum-exp (T, H) fp32."""
    _check_inputs(q, k, v, bias_table)
    num_tokens, num_heads, head_dim = q.shape
    # Kernels address (T, H, D) row-major: allocate contiguous outputs whatever q's strides are.
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(num_tokens, num_heads, device=q.device, dtype=torch.float32)
    if num_tokens == 0:
        return out, lse
    wz, wy, wx = as_triple(window_size)
    cu = cu_seqlens.to(torch.int32).contiguous()
    grid = (triton.cdiv(num_tokens, BLOCK_M), num_heads)
    _fwd_kernel[grid](
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out,
        lse,
        coords.to(torch.int32).contiguous(),
        _group_ids(cu, num_tokens),
        cu,
        bias_table.contiguous(),
        num_tokens,
        num_heads,
        head_dim,
        scale * LOG2E,
        wz,
        wy,
        wx,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=_head_block(head_dim),
        PRECISION=_precision(q.dtype),
        num_warps=4,
    )
    return out, lse


def _num_dkdv_programs(num_key_blocks: int, num_heads: int, device: torch.device) -> int:
    """Programs per head for the dK/dV kernel: enough to fill the GPU a few times over."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(8 * sms, num_heads)
    else:  # the interpreter runs programs one at a time
        wanted = 4
    return max(1, min(num_key_blocks, wanted))


def triton_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: Sequence[int],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward launches. Returns dq, dk, dv (input dtype) and the bias-table gradient (table dtype)."""
    num_tokens, num_heads, head_dim = q.shape
    num_rows = bias_table.shape[0]
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    if num_tokens == 0:
        return dq, dk, dv, torch.zeros_like(bias_table)
    wz, wy, wx = as_triple(window_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.contiguous()
    cu = cu_seqlens.to(torch.int32).contiguous()
    seg = _group_ids(cu, num_tokens)
    coords32 = coords.to(torch.int32).contiguous()
    table = bias_table.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # [T, H]
    block_d = _head_block(head_dim)
    precision = _precision(q.dtype)

    _bwd_dq_kernel[(triton.cdiv(num_tokens, BLOCK_M), num_heads)](
        q,
        k,
        v,
        grad_out,
        dq,
        lse,
        delta,
        coords32,
        seg,
        cu,
        table,
        num_tokens,
        num_heads,
        head_dim,
        scale,
        scale * LOG2E,
        wz,
        wy,
        wx,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=block_d,
        PRECISION=precision,
        num_warps=4,
    )
    num_key_blocks = triton.cdiv(num_tokens, BLOCK_N_BWD)
    programs = _num_dkdv_programs(num_key_blocks, num_heads, q.device)
    partial = torch.zeros(programs, num_heads, num_rows, device=q.device, dtype=torch.float32)
    _bwd_dkdv_kernel[(programs, num_heads)](
        q,
        k,
        v,
        grad_out,
        dk,
        dv,
        lse,
        delta,
        coords32,
        seg,
        cu,
        table,
        partial,
        num_tokens,
        num_heads,
        head_dim,
        num_rows,
        num_key_blocks,
        programs,
        scale,
        scale * LOG2E,
        wz,
        wy,
        wx,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N_BWD,
        BLOCK_D=block_d,
        PRECISION=precision,
        num_warps=4,
    )
    # A plain reduction over the program axis: fixed order, so bit-reproducible.
    dbias = partial.sum(0).t().contiguous().to(bias_table.dtype)  # [R, H], the strides the fake promises
    return dq, dk, dv, dbias


class WindowAttentionTriton(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the log-sum-exp, recomputes the softmax in backward."""

    @staticmethod
    def forward(ctx, q, k, v, coords, cu_seqlens, bias_table, window_size, scale):
        out, lse = triton_forward(q, k, v, coords, cu_seqlens, bias_table, window_size, scale)
        ctx.save_for_backward(q, k, v, out, lse, coords, cu_seqlens, bias_table)
        ctx.window_size, ctx.scale = tuple(as_triple(window_size)), scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, coords, cu_seqlens, bias_table = ctx.saved_tensors
        dq, dk, dv, dbias = triton_backward(
            grad_out, q, k, v, out, lse, coords, cu_seqlens, bias_table, ctx.window_size, ctx.scale
        )
        return dq, dk, dv, None, None, dbias, None, None


def window_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    bias_table: Tensor,
    window_size: int | Sequence[int],
    scale: float,
) -> Tensor:
    """Fused varlen window attention; shapes and semantics as ``varlen_window_attention``.

    Args:
        q, k, v: (T, H, D) fp32/bf16/fp16, sorted by group; D in 1..128 (best 16..64).
        coords: (T, 3) integer positions; unique within a group (they are positions in one sample).
        cu_seqlens: (G + 1,) int group offsets, cu_seqlens[0] = 0, cu_seqlens[-1] = T.
        bias_table: (R, H) with R = (2wz-1)(2wy-1)(2wx-1), any float dtype.
        window_size: the table's window; in-group offsets must lie in [-(w-1), w-1] per axis.
        scale: logit scale.

    Returns:
        (T, H, D) in q's dtype; differentiable in q, k, v and bias_table.
    """
    return WindowAttentionTriton.apply(q, k, v, coords, cu_seqlens, bias_table, as_triple(window_size), scale)
