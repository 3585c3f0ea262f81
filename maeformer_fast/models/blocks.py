"""nnFormer transformer blocks over packed tokens, shared by the dense model and the sparse encoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.permute import permute_rows
from ..ops.window_attention import varlen_window_attention
from ..ops.window_groups import Triple, bias_table_size, official_to_correct_rows, relative_position_index
from .tokens import Tokens


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample (batch index of each token)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor, batch: Tensor, batch_size: int) -> Tensor:
        """x: (T, C) branch output, batch: (T,) sample of each token."""
        if not self.training or self.rate == 0.0:
            return x
        keep = x.new_empty(batch_size).bernoulli_(1.0 - self.rate) / (1.0 - self.rate)
        return x * keep[batch][:, None]

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class Mlp(nn.Sequential):
    """Linear -> GELU -> Linear with hidden width ``ratio * dim``."""

    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class WindowAttention(nn.Module):
    """Multi-head attention inside 3D windows with a learned relative position bias.

    Self-attention projects q, k, v from the block input. Skip attention (first block of a decoder
    stage, nnFormer's "skip attention") takes k, v from a projection of the encoder skip and uses the
    normed upsampled decoder tokens directly as queries, as the official code does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Triple,
        skip_attention: bool = False,
        official_bias_index: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.skip_attention = skip_attention
        self.backend = backend
        if skip_attention:
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(bias_table_size(window_size), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        if official_bias_index:
            # Official weights alias offsets; read them through their index so behaviour matches upstream.
            self.register_buffer("official_rows", official_to_correct_rows(window_size), persistent=False)
        else:
            self.official_rows = None

    def bias_table(self) -> Tensor:
        """The table in the correct (one row per offset) layout, ((2wz-1)(2wy-1)(2wx-1), H)."""
        table = self.relative_position_bias_table
        return table if self.official_rows is None else table[self.official_rows]

    def project(self, x: Tensor, skip: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: (..., C) normed tokens (the queries' source); skip: (..., C) normed encoder skip for skip
        attention -> q, k, v, each (..., H, C / H)."""
        c, h = x.shape[-1], self.num_heads
        if self.skip_attention:
            if skip is None:
                raise ValueError("skip attention needs the encoder skip tokens")
            k, v = self.kv(skip).unflatten(-1, (2, h, c // h)).unbind(-3)
            # CUDA autocast keeps layer norms in fp32 while the kv Linear runs in bf16/fp16: the
            # queries (normed tokens, no projection) must join k and v in the kernel's dtype.
            return x.unflatten(-1, (h, c // h)).to(k.dtype), k, v
        q, k, v = self.qkv(x).unflatten(-1, (3, h, c // h)).unbind(-3)
        return q, k, v

    def forward(self, x: Tensor, coords: Tensor, cu_seqlens: Tensor, skip: Tensor | None = None) -> Tensor:
        """x: (T, C) normed tokens sorted by window (the queries' source); skip: (T, C) normed encoder
        skip in the same order for skip attention; coords: (T, 3); returns (T, C)."""
        q, k, v = self.project(x, skip)
        out = varlen_window_attention(
            q, k, v, coords, cu_seqlens, self.bias_table(), self.window_size, backend=self.backend
        )
        return self.proj(out.flatten(1))

    def forward_cyclic(
        self, x: Tensor, grid: Triple, window: Triple, shift: Triple, skip: Tensor | None
    ) -> Tensor:
        """ACDC's official window attention on a dense grid: x, skip (B, *grid, C) normed -> (B, *grid, C).

        The grid is zero-padded at the far end to a multiple of ``window`` and rolled by ``-shift``;
        every window attends over all its positions, wrapped ones and padding included (the padding
        keys and values are the projections' biases), with the bias of in-window offsets.
        """
        b, c = x.shape[0], x.shape[-1]
        pads = [(-g) % w for g, w in zip(grid, window)]
        padded = [g + p for g, p in zip(grid, pads)]
        counts = [p // w for p, w in zip(padded, window)]

        def windows(t: Tensor) -> Tensor:  # (B, *grid, C) -> (B * nW, N, C)
            t = torch.roll(
                F.pad(t, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0])), [-s for s in shift], (1, 2, 3)
            )
            t = t.view(b, counts[0], window[0], counts[1], window[1], counts[2], window[2], c)
            return t.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, math.prod(window), c)

        q, k, v = (
            t.transpose(1, 2) for t in self.project(windows(x), None if skip is None else windows(skip))
        )
        local = torch.stack(
            torch.meshgrid(*[torch.arange(w, device=x.device) for w in window], indexing="ij")
        )
        local = local.flatten(1).T  # (N, 3) in-window positions, C order
        bias = self.bias_table()[relative_position_index(local[:, None] - local[None], window)]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.permute(2, 0, 1).to(q.dtype))
        out = self.proj(out.transpose(1, 2).flatten(2))  # (B * nW, N, C)
        out = out.view(b, *counts, *window, c).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, *padded, c)
        out = torch.roll(out, list(shift), (1, 2, 3))
        return out[:, : grid[0], : grid[1], : grid[2]]


class TransformerBlock(nn.Module):
    """Pre-norm Swin-style block: (shifted) window attention then an MLP, each with a residual.

    ``cyclic``: ACDC's official window attention (:meth:`WindowAttention.forward_cyclic`), dense only.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Triple,
        shifted: bool,
        mlp_ratio: float,
        drop_path: float,
        skip_attention: bool = False,
        official_bias_index: bool = False,
        cyclic: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.cyclic = cyclic
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, skip_attention, official_bias_index, backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, tokens: Tokens, skip: Tensor | None = None) -> Tokens:
        """tokens.features (T, C); skip (T, C) encoder skip at the same positions for skip attention,
        where the residual stream starts from ``up + skip`` (official nnFormer)."""
        if self.cyclic:
            return tokens.with_features(self.cyclic_residual(tokens, skip))
        grouping, _ = tokens.grouping(self.window_size, self.shifted)
        x = self.residual(
            tokens.features, grouping.order, grouping.inverse, grouping.coords, grouping.cu_seqlens,
            tokens.batch, tokens.batch_size, skip,
        )  # fmt: skip
        return tokens.with_features(x)

    def residual(
        self,
        x: Tensor,
        order: Tensor,
        inverse: Tensor,
        coords: Tensor,
        cu_seqlens: Tensor,
        batch: Tensor,
        batch_size: int,
        skip: Tensor | None = None,
    ) -> Tensor:
        """The block's tensor math, (T, C) -> (T, C), given the window grouping of the tokens.

        Kept apart from the grouping (a data-dependent sort, made once per step by the plan) so that
        training can compile it without graph breaks or checkpoint it without redoing the sort.
        ``order``/``inverse`` (T,) sort tokens by window and back, ``coords`` (T, 3) and
        ``cu_seqlens`` (G + 1,) describe the sorted windows, ``batch`` (T,) is each token's sample.
        """
        normed = permute_rows(self.norm1(x), order, inverse)
        normed_skip = None if skip is None else permute_rows(self.norm1(skip), order, inverse)
        attended = permute_rows(self.attn(normed, coords, cu_seqlens, normed_skip), inverse, order)
        return self.finish(x, skip, attended, batch, batch_size)

    def cyclic_residual(self, tokens: Tokens, skip: Tensor | None) -> Tensor:
        """:meth:`residual` with ACDC's official window attention, on dense tokens: (T, C) -> (T, C)."""
        if not tokens.dense:
            raise ValueError("cyclic windows (official ACDC attention) need a dense grid")
        # official ACDC: the window is never clipped (the grid is padded up to it) and a shifted
        # block rolls every axis unless the window is the whole grid
        window = self.window_size
        rolled = self.shifted and tuple(tokens.grid) != tuple(window)
        shift = tuple(w // 2 if rolled else 0 for w in window)
        grid_shape = (tokens.batch_size, *tokens.grid, -1)
        normed_skip = None if skip is None else self.norm1(skip).view(grid_shape)
        attended = self.attn.forward_cyclic(
            self.norm1(tokens.features).view(grid_shape), tokens.grid, window, shift, normed_skip
        )
        return self.finish(
            tokens.features, skip, attended.reshape(tokens.features.shape), tokens.batch, tokens.batch_size
        )

    def finish(
        self, x: Tensor, skip: Tensor | None, attended: Tensor, batch: Tensor, batch_size: int
    ) -> Tensor:
        """Residuals around the attention output ``attended`` (T, C) and the MLP: (T, C) -> (T, C)."""
        shortcut = x if skip is None else x + skip
        x = shortcut + self.drop_path(attended, batch, batch_size)
        return x + self.drop_path(self.mlp(self.norm2(x)), batch, batch_size)
