"""Grouped shifted windows equal Swin's cyclic roll + attention mask, written here independently."""

import pytest
import torch

from maeformer_fast.models.tokens import Tokens
from maeformer_fast.ops import (
    bias_table_size,
    relative_position_index,
    varlen_window_attention,
    window_groups,
)


def swin_window_attention(q, k, v, window, shift, table):
    """Swin-Transformer formulation: roll by -shift, partition, mask wrapped regions, reverse.

    q, k, v: (B, Z, Y, X, H, D) dense grids whose sizes are multiples of the window.
    """
    b, z, y, x, h, d = q.shape
    wz, wy, wx = window
    dims = (1, 2, 3)
    rolled = [torch.roll(t, shifts=[-s for s in shift], dims=dims) for t in (q, k, v)]

    def partition(t):
        t = t.reshape(t.shape[0], z // wz, wz, y // wy, wy, x // wx, wx, *t.shape[4:])
        t = t.permute(0, 1, 3, 5, 2, 4, 6, *range(7, t.dim()))
        return t.reshape(-1, wz * wy * wx, *t.shape[7:])

    region = torch.zeros(1, z, y, x)
    label = 0
    for zs in (slice(0, -wz), slice(-wz, -shift[0] or None), slice(-shift[0] or None, None)):
        for ys in (slice(0, -wy), slice(-wy, -shift[1] or None), slice(-shift[1] or None, None)):
            for xs in (slice(0, -wx), slice(-wx, -shift[2] or None), slice(-shift[2] or None, None)):
                region[:, zs, ys, xs] = label
                label += 1
    region_windows = partition(region)  # [nW, N]
    mask = torch.where(region_windows[:, :, None] != region_windows[:, None, :], float("-inf"), 0.0)
    local = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij"), -1).reshape(-1, 3)
    bias = table[relative_position_index(local[:, None] - local[None], window)].permute(2, 0, 1)  # [H, N, N]
    qw, kw, vw = (partition(t) for t in rolled)  # [B*nW, N, H, D]
    logits = torch.einsum("wihd,wjhd->whij", qw, kw) / d**0.5 + bias + mask.repeat(b, 1, 1)[:, None]
    out = torch.einsum("whij,wjhd->wihd", logits.softmax(-1), vw)
    out = out.reshape(b, z // wz, y // wy, x // wx, wz, wy, wx, h, d).permute(0, 1, 4, 2, 5, 3, 6, 7, 8)
    return torch.roll(out.reshape(b, z, y, x, h, d), shifts=list(shift), dims=dims)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    ("grid", "window", "shift"),
    [
        ((8, 8, 8), (4, 4, 4), (2, 2, 2)),
        ((4, 8, 12), (2, 4, 4), (1, 2, 2)),
        ((6, 6, 9), (3, 3, 3), (1, 1, 1)),
        ((8, 8, 8), (4, 4, 4), (0, 0, 0)),
    ],
)
def test_grouped_windows_equal_swin_roll_and_mask(grid, window, shift, backend):
    torch.manual_seed(0)
    b, h, d = 2, 2, 4
    q, k, v = (torch.randn(b, *grid, h, d, dtype=torch.float32) for _ in range(3))
    table = torch.randn(bias_table_size(window), h, dtype=torch.float32)
    expected = swin_window_attention(q, k, v, window, shift, table)

    tokens = Tokens.from_grid(torch.zeros(b, 1, *grid))

    order, cu_seqlens = window_groups(tokens.coords, tokens.batch, window, shift)
    flat = [t.reshape(-1, h, d)[order] for t in (q, k, v)]
    out_sorted = varlen_window_attention(
        *flat, tokens.coords[order], cu_seqlens, table, window, backend=backend
    )
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    torch.testing.assert_close(out.reshape(b, *grid, h, d), expected, atol=1e-5, rtol=1e-5)
