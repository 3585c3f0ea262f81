"""nnFormer transformer blocks over packed tokens, shared by the dense model and the sparse encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.permute import permute_rows
from ..ops.window_attention import varlen_window_attention
from ..ops.window_groups import Triple, bias_table_size, official_to_correct_rows
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

    def forward(self, x: Tensor, coords: Tensor, cu_seqlens: Tensor, skip: Tensor | None = None) -> Tensor:
        """x: (T, C) normed tokens sorted by window (the queries' source); skip: (T, C) normed encoder
        skip in the same order for skip attention; coords: (T, 3); returns (T, C)."""
        t, c = x.shape
        h = self.num_heads
        if self.skip_attention:
            if skip is None:
                raise ValueError("skip attention needs the encoder skip tokens")
            k, v = self.kv(skip).view(t, 2, h, c // h).unbind(1)
            # CUDA autocast keeps layer norms in fp32 while the kv Linear runs in bf16/fp16: the
            # queries (normed tokens, no projection) must join k and v in the kernel's dtype.
            q = x.view(t, h, c // h).to(k.dtype)
        else:
            q, k, v = self.qkv(x).view(t, 3, h, c // h).unbind(1)
        out = varlen_window_attention(
            q, k, v, coords, cu_seqlens, self.bias_table(), self.window_size, backend=self.backend
        )
        return self.proj(out.reshape(t, c))


class TransformerBlock(nn.Module):
    """Pre-norm Swin-style block: (shifted) window attention then an MLP, each with a residual."""

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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, skip_attention, official_bias_index, backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, tokens: Tokens, skip: Tensor | None = None) -> Tokens:
        """tokens.features (T, C); skip (T, C) encoder skip at the same positions for skip attention,
        where the residual stream starts from ``up + skip`` (official nnFormer)."""
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
        shortcut = x if skip is None else x + skip
        normed = permute_rows(self.norm1(x), order, inverse)
        normed_skip = None if skip is None else permute_rows(self.norm1(skip), order, inverse)
        attended = permute_rows(self.attn(normed, coords, cu_seqlens, normed_skip), inverse, order)
        x = shortcut + self.drop_path(attended, batch, batch_size)
        return x + self.drop_path(self.mlp(self.norm2(x)), batch, batch_size)
