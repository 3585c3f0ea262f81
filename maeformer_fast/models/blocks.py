"""nnFormer transformer blocks over packed tokens, shared by the dense model and the sparse encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.grid_windows import from_windows, to_windows, window_mask, window_rows
from ..ops.permute import permute_rows
from ..ops.window_attention import attend_with_bias, varlen_window_attention
from ..ops.window_groups import bias_table_size, official_to_correct_rows
from ..types import Triple
from .tokens import GridWindows, Tokens, WindowGrouping, stage_window, windows_from_grid


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

    def forward_grid(self, x: Tensor, windows: GridWindows, skip: Tensor | None = None) -> Tensor:
        """Attention in windows cut from a dense grid (``ops.grid_windows``): x, skip (B, *grid, C)
        normed -> (B, *grid, C). Each window attends over the pairs ``windows.mask`` allows (all of
        them without a mask), with the bias of in-window offsets."""
        window, shift, mask = windows.window, windows.shift, windows.mask
        q, k, v = self.project(
            to_windows(x, window, shift), None if skip is None else to_windows(skip, window, shift)
        )  # (B, nW, L, H, D) each
        b, count, length, heads, dim = q.shape
        bias = self.bias_table()[window_rows(window, self.window_size, x.device)].permute(2, 0, 1)
        if mask is None:  # one (H, L, L) bias for all B * nW windows
            q, k, v = (t.flatten(0, 1).transpose(1, 2) for t in (q, k, v))  # (B * nW, H, L, D)
        else:  # windows and heads as one axis: a (nW * H, L, L) bias shared by the B volumes
            bias = bias.masked_fill(~mask[:, None], float("-inf")).flatten(0, 1)
            q, k, v = (t.transpose(2, 3).reshape(b, count * heads, length, dim) for t in (q, k, v))
        out = attend_with_bias(q, k, v, bias.to(q.dtype), dim**-0.5)
        out = out.view(b, count, heads, length, dim).transpose(2, 3).reshape(b, count, length, -1)
        return from_windows(self.proj(out), windows.grid, window, shift)


class TransformerBlock(nn.Module):
    """Pre-norm Swin-style block: (shifted) window attention then an MLP, each with a residual.

    ``cyclic``: ACDC's official window attention (windows cut from the grid without a mask, see
    :meth:`TransformerBlock.windows`), dense only.
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
        windows = self.windows(tokens)
        x = self.residual(tokens.features, skip, windows, tokens.batch, tokens.batch_size)
        return tokens.with_features(x)

    def windows(self, tokens: Tokens) -> WindowGrouping | GridWindows:
        """How this block's windows are formed on ``tokens``: cut from the grid where the tokens are
        a dense grid and the attention runs on the torch backend (``tokens.windows_from_grid``) or the
        windows are ACDC's cyclic ones; else the plan's grouping of packed tokens."""
        device = tokens.features.device
        if not windows_from_grid(tokens.dense, self.cyclic, self.attn.backend, device):
            grouping, _ = tokens.grouping(self.window_size, self.shifted)
            return grouping
        if not tokens.dense:
            raise ValueError("cyclic windows (official ACDC attention) need a dense grid")
        if self.cyclic:
            # official ACDC: the window is never clipped (the grid is padded up to it), a shifted
            # block rolls every axis unless the window is the whole grid, and nothing is masked
            rolled = self.shifted and tuple(tokens.grid) != tuple(self.window_size)
            shift = tuple(w // 2 if rolled else 0 for w in self.window_size)
            return GridWindows(tokens.grid, self.window_size, shift, None)  # type: ignore[arg-type]
        window, shift = stage_window(tokens.grid, self.window_size, self.shifted)
        return GridWindows(tokens.grid, window, shift, window_mask(tokens.grid, window, shift, device))

    def residual(
        self,
        x: Tensor,
        skip: Tensor | None,
        windows: WindowGrouping | GridWindows,
        batch: Tensor,
        batch_size: int,
    ) -> Tensor:
        """The block's tensor math, (T, C) -> (T, C), given how the tokens form windows.

        Kept apart from forming the windows (a data-dependent sort for packed tokens, made once per
        step by the plan) so that training can compile it without graph breaks or checkpoint it
        without redoing the sort. A grouping's ``order``/``inverse`` (T,) sort tokens by window and
        back; grid windows need dense tokens in (b, z, y, x) order. ``batch`` (T,): each token's sample.
        """
        normed = self.norm1(x)
        normed_skip = None if skip is None else self.norm1(skip)
        if isinstance(windows, GridWindows):
            shape = (batch_size, *windows.grid, -1)
            grid_skip = None if normed_skip is None else normed_skip.view(shape)
            attended = self.attn.forward_grid(normed.view(shape), windows, grid_skip).reshape(x.shape)
        else:
            order, inverse = windows.order, windows.inverse
            sorted_skip = None if normed_skip is None else permute_rows(normed_skip, order, inverse)
            attended = self.attn(
                permute_rows(normed, order, inverse), windows.coords, windows.cu_seqlens, sorted_skip
            )
            attended = permute_rows(attended, inverse, order)
        return self.finish(x, skip, attended, batch, batch_size)

    def finish(
        self, x: Tensor, skip: Tensor | None, attended: Tensor, batch: Tensor, batch_size: int
    ) -> Tensor:
        """Residuals around the attention output ``attended`` (T, C) and the MLP: (T, C) -> (T, C)."""
        shortcut = x if skip is None else x + skip
        x = shortcut + self.drop_path(attended, batch, batch_size)
        return x + self.drop_path(self.mlp(self.norm2(x)), batch, batch_size)
