"""nnFormer (Zhou et al., TPAMI 2024) over packed tokens, for any input size.

The encoder is a module of its own returning per-stage features, so it serves as a backbone and as
the MAE encoder; the decoder mirrors it with skip attention and transposed-conv upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.sparse_conv import sparse_conv3d, unit_block_conv3d
from ..ops.window_groups import Triple
from .blocks import TransformerBlock
from .config import NNFormerConfig, padded_size
from .plan import EncoderPlan, plan_encoder
from .tokens import Tokens, grid_features


def conv_tokens(conv: nn.Conv3d, tokens: Tokens) -> Tokens:
    """Apply a 3x3x3, padding-1 conv to tokens as the layout's plan says: densely on a dense grid, from
    the neighbour table (Triton) or unit by unit (CPU block form) on visible units."""
    plan = tokens.layout.conv(conv.stride)
    if tokens.dense:
        return Tokens.from_grid(conv(tokens.to_grid()), plan.out)
    if plan.table is not None:
        out = sparse_conv3d(tokens.features, plan.table, plan.transposed, conv.weight, conv.bias)
    else:
        out = unit_block_conv3d(tokens.features, plan.halo, conv.weight, conv.bias, conv.stride)
    return Tokens(out, plan.out)


class ConvNormAct(nn.Module):
    """3x3x3 conv, then optionally GELU + LayerNorm (one half of the official ``project`` module)."""

    def __init__(self, in_dim: int, out_dim: int, stride: Triple, activate: bool) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_dim, out_dim, kernel_size=3, stride=stride, padding=1)
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
    """GELU -> LayerNorm -> Conv3d(C -> 2C, k3, s2, p1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Conv3d(dim, 2 * dim, kernel_size=3, stride=2, padding=1)

    def forward(self, tokens: Tokens) -> Tokens:
        return conv_tokens(self.reduction, tokens.with_features(self.norm(F.gelu(tokens.features))))


class Upsample(nn.Module):
    """LayerNorm -> ConvTranspose3d(2C -> C, k2, s2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.up = nn.ConvTranspose3d(2 * dim, dim, kernel_size=2, stride=2)

    def forward(self, tokens: Tokens) -> Tensor:
        """Dense tokens (B*Z*Y*X, 2C) -> (B, C, 2Z, 2Y, 2X)."""
        return self.up(tokens.with_features(self.norm(tokens.features)).to_grid())


def make_blocks(
    config: NNFormerConfig, stage: int, drop_rates: list[float], skip_attention_first: bool
) -> nn.ModuleList:
    """The blocks of one stage: even blocks plain windows, odd blocks shifted by half a window."""
    return nn.ModuleList(
        [
            TransformerBlock(
                dim=config.stage_dim(stage),
                num_heads=config.num_heads[stage],
                window_size=config.window_sizes[stage],
                shifted=i % 2 == 1,
                mlp_ratio=config.mlp_ratio,
                drop_path=drop_rates[i],
                skip_attention=skip_attention_first and i == 0,
                official_bias_index=config.official_bias_index,
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
        self.blocks = make_blocks(config, stage, drop_rates, skip_attention_first=False)
        self.norm = nn.LayerNorm(dim)
        self.downsample = Downsample(dim) if stage < config.num_stages - 1 else None

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
        """The per-step plan for (B, C_in, *size) inputs (a multiple of the total stride): every
        stage's layout, window groupings and conv indices; visible-only when ``visible_ids`` is given."""
        self.unit_grid(size)  # checks the size
        return plan_encoder(self.config, batch_size, tuple(size), device, visible_ids)

    def forward_tokens(self, x: Tensor, plan: EncoderPlan | None = None) -> list[Tokens]:
        """x: (B, C_in, Z, Y, X), a multiple of the total stride -> per-stage tokens of ``plan``'s
        layouts (dense unless the plan is visible-only; made here when not given)."""
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

        Inputs that are not a multiple of the total stride are zero-padded at the far end; the
        features then cover the padded volume.
        """
        x = pad_to_multiple(x, self.config.total_stride)
        return [t.to_grid() for t in self.forward_tokens(x)]


class DecoderStage(nn.Module):
    """Upsampling, skip attention with the encoder features, then window-attention blocks."""

    def __init__(self, config: NNFormerConfig, stage: int, drop_rates: list[float]) -> None:
        super().__init__()
        self.upsample = Upsample(config.stage_dim(stage))
        self.blocks = make_blocks(config, stage, drop_rates, skip_attention_first=True)

    def forward(self, tokens: Tokens, skip: Tokens) -> Tokens:
        """tokens: the stage below (dense); skip: the encoder output at this stage's resolution."""
        up = grid_features(self.upsample(tokens))  # same dense C order as the skip's layout
        x = self.blocks[0](skip.with_features(up), skip=skip.features)
        for block in self.blocks[1:]:
            x = block(x)
        return x


class NNFormer(nn.Module):
    """nnFormer segmentation network.

    ``forward`` takes (B, C_in, Z, Y, X) of any size (padded internally to a multiple of the total
    stride, output cropped back) and returns logits (B, classes, Z, Y, X); in training mode with deep
    supervision it returns a list [full, 1/2, 1/4 resolution], the lower ones of size ceil(size / 2^i).
    """

    def __init__(self, config: NNFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = NNFormerEncoder(config)
        rates = stage_drop_rates(config)
        self.decoder = nn.ModuleList(
            [DecoderStage(config, i, rates[i][::-1]) for i in range(config.num_stages - 2, -1, -1)]
        )
        head_stages = range(min(3, config.num_stages - 1)) if config.deep_supervision else range(1)
        self.heads = nn.ModuleList(
            [
                nn.ConvTranspose3d(
                    config.stage_dim(i), config.num_classes, config.patch_size, config.patch_size
                )
                for i in head_stages
            ]
        )
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        size = x.shape[2:]
        features = self.encoder.forward_tokens(pad_to_multiple(x, self.config.total_stride))
        tokens = features[-1]
        decoded = []
        for stage in self.decoder:
            tokens = stage(tokens, features[len(features) - 2 - len(decoded)])
            decoded.append(tokens)
        decoded = decoded[::-1]  # full resolution first
        outputs = []
        for level, (head, d) in enumerate(zip(self.heads, decoded)):
            crop = [-(-s // 2**level) for s in size]  # ceil(size / 2^level): the input's extent there
            outputs.append(head(d.to_grid())[:, :, : crop[0], : crop[1], : crop[2]])
            if not (self.training and self.config.deep_supervision):
                break
        return outputs if len(outputs) > 1 else outputs[0]


def pad_to_multiple(x: Tensor, multiple: Triple) -> Tensor:
    """Zero-pad (B, C, Z, Y, X) at the far end of each axis to a multiple of ``multiple``."""
    target = padded_size(tuple(x.shape[2:]), multiple)
    pads = [t - s for t, s in zip(target, x.shape[2:])]
    if not any(pads):
        return x
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights (std 0.02) and zero biases, unit LayerNorms (Swin/nnFormer)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
