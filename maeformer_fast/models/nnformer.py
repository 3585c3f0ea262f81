"""nnFormer (Zhou et al., TPAMI 2024) over packed tokens, for any input size.

The encoder is a module of its own returning per-stage features, so it serves as a backbone and as
the MAE encoder; the decoder mirrors it with skip attention and transposed-conv upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.sparse_conv import sparse_conv3d, unit_block_conv3d
from ..types import Triple
from .blocks import TransformerBlock
from .config import NNFormerConfig
from .plan import EncoderPlan, plan_encoder
from .tokens import Tokens, grid_features


class TokenConv3d(nn.Conv3d):
    """A Conv3d with, per axis, kernel 1 (stride 1, padding 0), or kernel 3 and padding 1, or kernel 3,
    stride 2 and padding 0 (an "odd-phase" axis: the taps of output i sit on inputs 2i .. 2i+2).

    On a dense grid it pads odd-phase axes by one zero slice at the far end, so that any length L
    gives floor(L / 2) outputs (the official count for odd L, unit-aligned for even L). The sparse
    ops only run 3x3x3 padding-1 kernels: ``sparse_weight`` zero-pads kernel-1 axes to 3 taps, and an
    odd-phase axis is the padding-1 conv at stride 1 (``sparse_stride``) read at odd positions.
    """

    @property
    def odd_phase(self) -> tuple[bool, bool, bool]:
        return tuple(k == 3 and p == 0 for k, p in zip(self.kernel_size, self.padding))  # type: ignore[return-value]

    @property
    def sparse_stride(self) -> Triple:
        return tuple(1 if odd else s for odd, s in zip(self.odd_phase, self.stride))  # type: ignore[return-value]

    def sparse_weight(self) -> Tensor:
        """(C_out, C_in, 3, 3, 3): the weight with kernel-1 axes zero-padded to three taps."""
        pads = [t for k in reversed(self.kernel_size) for t in ((3 - k) // 2,) * 2]
        return F.pad(self.weight, pads) if any(pads) else self.weight

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, Z, Y, X) -> (B, C_out, Z', Y', X')."""
        if any(self.odd_phase):
            x = F.pad(x, [t for odd in reversed(self.odd_phase) for t in (0, int(odd))])
        return super().forward(x)


def conv_tokens(conv: TokenConv3d, tokens: Tokens) -> Tokens:
    """Apply a conv to tokens as the layout's plan says: densely on a dense grid, from the neighbour
    table (Triton) or unit by unit (CPU block form) on visible units, keeping the odd positions of
    odd-phase axes (see :class:`TokenConv3d`)."""
    plan = tokens.layout.conv(conv.stride)
    if tokens.dense:
        return Tokens.from_grid(conv(tokens.to_grid()), plan.out)
    weight = conv.sparse_weight()
    if plan.table is not None:
        out = sparse_conv3d(tokens.features, plan.table, plan.transposed, weight, conv.bias)
    else:
        out = unit_block_conv3d(tokens.features, plan.halo, weight, conv.bias, conv.sparse_stride)
    return Tokens(out if plan.keep is None else out[plan.keep], plan.out)


class ConvNormAct(nn.Module):
    """3x3x3 conv, then optionally GELU + LayerNorm (one half of the official ``project`` module)."""

    def __init__(self, in_dim: int, out_dim: int, stride: Triple, activate: bool) -> None:
        super().__init__()
        self.conv = TokenConv3d(in_dim, out_dim, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.LayerNorm(out_dim) if activate else None

    def forward(self, tokens: Tokens) -> Tokens:
        tokens = conv_tokens(self.conv, tokens)
        return tokens if self.norm is None else tokens.with_features(self.norm(F.gelu(tokens.features)))


class PatchEmbed(nn.Module):
    """Four 3x3x3 convs (strided, 1, strided, 1) in -> E/2 -> E/2 -> E -> E, then LayerNorm."""

    def __init__(self, in_channels: int, embed_dim: int, strides: tuple[Triple, Triple]) -> None:
        super().__init__()
        first, second = strides
        half = embed_dim // 2
        self.layers = nn.ModuleList(
            [
                ConvNormAct(in_channels, half, first, activate=True),
                ConvNormAct(half, half, (1, 1, 1), activate=True),
                ConvNormAct(half, embed_dim, second, activate=True),
                ConvNormAct(embed_dim, embed_dim, (1, 1, 1), activate=False),
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, tokens: Tokens) -> Tokens:
        """Voxel tokens (C_in channels) -> tokens on the patch grid (E channels)."""
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens.with_features(self.norm(tokens.features))


class Downsample(nn.Module):
    """GELU -> LayerNorm -> Conv3d(C -> 2C), kernel 3, stride 2, padding 1 unless the config says
    otherwise (ACDC: see :class:`TokenConv3d`)."""

    def __init__(self, dim: int, kernel: Triple, stride: Triple, padding: Triple) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = TokenConv3d(dim, 2 * dim, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, tokens: Tokens) -> Tokens:
        return conv_tokens(self.reduction, tokens.with_features(self.norm(F.gelu(tokens.features))))


class Upsample(nn.Module):
    """LayerNorm -> ConvTranspose3d(2C -> C, kernel = stride = the downsampling's stride), with
    output padding 1 on the downsampling's odd-phase axes; cropped to the skip's grid."""

    def __init__(self, dim: int, stride: Triple, output_padding: Triple) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.up = nn.ConvTranspose3d(2 * dim, dim, stride, stride, output_padding=output_padding)

    def forward(self, tokens: Tokens, grid: Triple) -> Tensor:
        """Dense tokens (B*Z*Y*X, 2C) -> (B, C, *grid), ``grid`` the skip's (at most the output)."""
        up = self.up(tokens.with_features(self.norm(tokens.features)).to_grid())
        return up[:, :, : grid[0], : grid[1], : grid[2]]


def make_blocks(config: NNFormerConfig, stage: int, drop_rates: list[float], decoder: bool) -> nn.ModuleList:
    """The blocks of one stage: even blocks plain windows, odd blocks shifted by half a window; a
    decoder stage's first block is skip attention."""
    return nn.ModuleList(
        [
            TransformerBlock(
                dim=config.stage_dim(stage),
                num_heads=config.decoder_num_heads[stage] if decoder else config.num_heads[stage],
                window_size=config.window_sizes[stage],
                shifted=i % 2 == 1,
                mlp_ratio=config.mlp_ratio,
                drop_path=drop_rates[i],
                skip_attention=decoder and i == 0,
                official_bias_index=config.official_bias_index,
                cyclic=config.cyclic_windows,
                backend=config.attention_backend,
            )
            for i in range(config.depths[stage])
        ]
    )


def stage_drop_rates(config: NNFormerConfig) -> list[list[float]]:
    """Stochastic depth rising linearly from 0 to ``drop_path_rate`` over all encoder blocks."""
    total = sum(config.depths)
    rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(config.depths[:i]) for i in range(config.num_stages)]
    return [rates[s : s + d] for s, d in zip(starts, config.depths)]


class EncoderStage(nn.Module):
    """Window-attention blocks, a LayerNorm for the stage output, and (but last) a downsampling."""

    def __init__(self, config: NNFormerConfig, stage: int, drop_rates: list[float]) -> None:
        super().__init__()
        dim = config.stage_dim(stage)
        self.blocks = make_blocks(config, stage, drop_rates, decoder=False)
        self.norm = nn.LayerNorm(dim)
        self.downsample = None
        if stage < config.num_stages - 1:
            self.downsample = Downsample(
                dim,
                config.downsampling_kernels[stage],
                config.downsampling_strides[stage],
                config.downsampling_paddings[stage],
            )

    def forward(self, tokens: Tokens) -> tuple[Tokens, Tokens | None]:
        """Returns (normed stage output, input of the next stage or None at the last stage)."""
        for block in self.blocks:
            tokens = block(tokens)
        out = tokens.with_features(self.norm(tokens.features))
        return out, None if self.downsample is None else self.downsample(tokens)


class NNFormerEncoder(nn.Module):
    """Convolutional embedding and encoder stages; returns the normed features of every stage."""

    def __init__(self, config: NNFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.in_channels, config.embed_dim, config.embedding_strides)
        rates = stage_drop_rates(config)
        self.stages = nn.ModuleList([EncoderStage(config, i, rates[i]) for i in range(config.num_stages)])

    def unit_grid(self, size: Triple) -> Triple:
        """Mask units per axis for an input of ``size`` voxels (a multiple of the total stride)."""
        stride = self.config.total_stride
        if any(s % t for s, t in zip(size, stride)):
            raise ValueError(f"input size {tuple(size)} is not a multiple of the mask unit {stride}")
        return tuple(s // t for s, t in zip(size, stride))  # type: ignore[return-value]

    def plan(
        self, batch_size: int, size: Triple, device: torch.device | str, visible_ids: Tensor | None = None
    ) -> EncoderPlan:
        """The per-step plan for (B, C_in, *size) inputs: every stage's layout, window groupings and
        conv indices; visible-only when ``visible_ids`` is given (then ``size`` must be a multiple of
        the total stride)."""
        if visible_ids is not None:
            self.unit_grid(size)  # checks the size
        return plan_encoder(self.config, batch_size, tuple(size), device, visible_ids)

    def forward_tokens(self, x: Tensor, plan: EncoderPlan | None = None) -> list[Tokens]:
        """x: (B, C_in, Z, Y, X) -> per-stage tokens of ``plan``'s layouts (dense unless the plan is
        visible-only; made here when not given)."""
        plan = self.plan(x.shape[0], tuple(x.shape[2:]), x.device) if plan is None else plan
        return self.forward_stages(self.patch_embed(Tokens.from_grid(x, plan.input)))

    def forward_visible(
        self, x: Tensor, visible_ids: Tensor, plan: EncoderPlan | None = None
    ) -> list[Tokens]:
        """Visible-only encoding for MAE: no layer computes a masked position.

        Args:
            x: (B, C_in, Z, Y, X) crops, a multiple of the total stride (masked voxels are never read).
            visible_ids: (B, K) flat indices of the visible mask units (see ``ops.masking``).
            plan: ``self.plan(B, size, device, visible_ids)`` if already built (e.g. before a timed
                or captured region); made here otherwise.

        Returns:
            Per-stage sparse tokens of the visible units; at the last stage one token per unit.
        """
        if plan is None:
            plan = self.plan(x.shape[0], tuple(x.shape[2:]), x.device, visible_ids)
        return self.forward_tokens(x, plan)

    def forward_stages(self, tokens: Tokens | None) -> list[Tokens]:
        """Embedded tokens -> the normed output tokens of every stage."""
        outputs = []
        for stage in self.stages:
            out, tokens = stage(tokens)
            outputs.append(out)
        return outputs

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, C_in, Z, Y, X) -> [(B, E * 2^i, Z_i, Y_i, X_i) for each stage i].

        Every strided layer rounds its grid up (ceil(Z / s)), as the official downsampling does (the
        official patch embedding pads the input to a multiple of the patch instead: docs/models.md);
        odd-phase axes round down (see :class:`TokenConv3d`).
        """
        return [t.to_grid() for t in self.forward_tokens(x)]


class DecoderStage(nn.Module):
    """Upsampling, skip attention with the encoder features, then window-attention blocks."""

    def __init__(self, config: NNFormerConfig, stage: int, drop_rates: list[float]) -> None:
        super().__init__()
        kernel, padding = config.downsampling_kernels[stage], config.downsampling_paddings[stage]
        output_padding = tuple(k // 2 - p for k, p in zip(kernel, padding))  # 1 on odd-phase axes
        self.upsample = Upsample(config.stage_dim(stage), config.downsampling_strides[stage], output_padding)
        self.blocks = make_blocks(config, stage, drop_rates, decoder=True)

    def forward(self, tokens: Tokens, skip: Tokens) -> Tokens:
        """tokens: the stage below (dense); skip: the encoder output at this stage's resolution."""
        up = grid_features(self.upsample(tokens, skip.grid))  # same dense C order as the skip's layout
        x = self.blocks[0](skip.with_features(up), skip=skip.features)
        for block in self.blocks[1:]:
            x = block(x)
        return x


class NNFormer(nn.Module):
    """nnFormer segmentation network.

    ``forward`` takes (B, C_in, Z, Y, X) of any size (strided layers round up, the decoder crops
    back; docs/models.md says where this differs from the official network) and returns logits
    (B, classes, Z, Y, X); in training mode with deep supervision it returns a list [full, 1/2, 1/4
    resolution], the lower ones of size ceil(size / s_i), s_i the downsampling stride from stage 0 to
    stage i.
    """

    def __init__(self, config: NNFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = NNFormerEncoder(config)
        rates = stage_drop_rates(config)
        self.decoder = nn.ModuleList(
            [DecoderStage(config, i, rates[i][::-1]) for i in range(config.num_stages - 2, -1, -1)]
        )
        self.heads = nn.ModuleList(
            [
                nn.ConvTranspose3d(
                    config.stage_dim(i), config.num_classes, config.patch_size, config.patch_size
                )
                for i in range(len(config.output_strides))
            ]
        )
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        outputs = self.segment(x, deep_supervision=self.training and self.config.deep_supervision)
        return outputs if len(outputs) > 1 else outputs[0]

    def segment(self, x: Tensor, deep_supervision: bool) -> list[Tensor]:
        """x: (B, C_in, Z, Y, X) -> [(B, classes, *size_i)]: every head's logits with
        ``deep_supervision`` (sizes ``config.output_sizes``, full resolution first), else the
        full-resolution logits alone -- whether training or not (nnU-Net's validation steps want
        deep supervision in eval mode)."""
        features = self.encoder.forward_tokens(x)
        tokens = features[-1]
        decoded = []
        for stage in self.decoder:
            tokens = stage(tokens, features[len(features) - 2 - len(decoded)])
            decoded.append(tokens)
        decoded = decoded[::-1]  # full resolution first
        outputs = []
        for head, d, crop in zip(self.heads, decoded, self.config.output_sizes(tuple(x.shape[2:]))):
            outputs.append(head(d.to_grid())[:, :, : crop[0], : crop[1], : crop[2]])
            if not deep_supervision:
                break
        return outputs


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights (std 0.02) and zero biases, unit LayerNorms (Swin/nnFormer)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
