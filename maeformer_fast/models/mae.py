"""Masked autoencoder around the nnFormer encoder: visible-only (MAE) or dense with mask tokens (SimMIM).

Follows facebookresearch/mae's structure: ``forward_encoder``, ``forward_decoder``, ``forward_loss``.
One mask unit is the encoder's total stride, so at the last stage every unit is one token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.masking import visible_mask_grid
from ..types import Triple
from .config import NNFormerConfig
from .nnformer import NNFormerEncoder, init_weights
from .plan import EncoderPlan
from .tokens import Tokens

ENCODER_MODES = ("sparse", "dense")


def sincos_position_embedding(unit_grid: Triple, dim: int, device: torch.device) -> Tensor:
    """Fixed 3D sine-cosine embedding (prod(unit_grid), dim) of unit positions, for any grid size.

    A third of the channels (rounded down to an even count) encodes each axis; the rest stay zero.
    """
    per_axis = (dim // 3) // 2 * 2
    freqs = 1.0 / (
        10000 ** (torch.arange(per_axis // 2, device=device, dtype=torch.float32) / (per_axis // 2))
    )
    axes = torch.meshgrid(
        *[torch.arange(n, device=device, dtype=torch.float32) for n in unit_grid], indexing="ij"
    )
    parts = []
    for axis in axes:
        angles = axis.reshape(-1, 1) * freqs[None]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return nn.functional.pad(embedding, (0, dim - embedding.shape[1]))


def patchify(images: Tensor, unit: Triple) -> Tensor:
    """(B, C, Z, Y, X) -> (B, units, prod(unit) * C): the voxels of every mask unit, C order."""
    b, c, z, y, x = images.shape
    uz, uy, ux = unit
    t = images.reshape(b, c, z // uz, uz, y // uy, uy, x // ux, ux)
    return t.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (z // uz) * (y // uy) * (x // ux), -1)


def unpatchify(patches: Tensor, unit: Triple, unit_grid: Triple, channels: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, units, prod(unit) * C) -> (B, C, Z, Y, X)."""
    b = patches.shape[0]
    (gz, gy, gx), (uz, uy, ux) = unit_grid, unit
    t = patches.reshape(b, gz, gy, gx, uz, uy, ux, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return t.reshape(b, channels, gz * uz, gy * uy, gx * ux)


class MAEDecoder(nn.Module):
    """Light transformer over all units: encoded visible units + a mask token elsewhere + positions."""

    def __init__(
        self, encoder_dim: int, unit_values: int, dim: int = 128, depth: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, unit_values)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, features: Tensor, visible: Tensor, unit_grid: Triple) -> Tensor:
        """features (B, N, C_enc), visible (B, N) bool (only visible rows are read) -> (B, N, unit_values)."""
        x = torch.where(visible[..., None], self.embed(features), self.mask_token.to(features.dtype))
        x = x + sincos_position_embedding(unit_grid, x.shape[-1], x.device).to(x.dtype)
        return self.head(self.norm(self.blocks(x)))


class MaskedAutoencoder(nn.Module):
    """nnFormer encoder + MAE decoder.

    ``encoder_mode="sparse"`` encodes visible units only (the fast path); ``"dense"`` is the
    SimMIM-style baseline: masked voxels are zeroed, a learned mask token replaces masked tokens after
    the embedding, and every position of every layer is computed. Both use the same encoder weights
    (``self.encoder`` has the state dict of ``NNFormer.encoder``) and the same decoder and loss.
    """

    def __init__(
        self,
        config: NNFormerConfig,
        encoder_mode: str = "sparse",
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if encoder_mode not in ENCODER_MODES:
            raise ValueError(f"encoder_mode must be one of {ENCODER_MODES}, got {encoder_mode!r}")
        self.config = config
        self.encoder_mode = encoder_mode
        self.norm_pix_loss = norm_pix_loss
        self.encoder = NNFormerEncoder(config)
        unit_values = math.prod(config.total_stride) * config.in_channels
        encoder_dim = config.stage_dim(config.num_stages - 1)
        self.decoder = MAEDecoder(encoder_dim, unit_values, decoder_dim, decoder_depth, decoder_heads)
        self.embed_mask_token = (
            nn.Parameter(torch.zeros(config.embed_dim)) if encoder_mode == "dense" else None
        )
        self.apply(init_weights)
        if self.embed_mask_token is not None:
            nn.init.normal_(self.embed_mask_token, std=0.02)

    def plan(self, images: Tensor, visible_ids: Tensor) -> EncoderPlan:
        """The encoder's per-step plan for this batch and mask (visible-only in sparse mode)."""
        ids = visible_ids if self.encoder_mode == "sparse" else None
        return self.encoder.plan(images.shape[0], tuple(images.shape[2:]), images.device, ids)

    def forward_encoder(self, images: Tensor, visible_ids: Tensor, plan: EncoderPlan | None = None) -> Tensor:
        """images (B, C, Z, Y, X), visible_ids (B, K) -> last-stage unit features (B, N, C_last).

        Rows of masked units are zero in sparse mode (never computed). ``plan``: see :meth:`plan`.
        """
        plan = self.plan(images, visible_ids) if plan is None else plan
        if self.encoder_mode == "sparse":
            last = self.encoder.forward_visible(images, visible_ids, plan)[-1]
            return last.to_grid().flatten(2).transpose(1, 2)
        unit_grid = self.encoder.unit_grid(tuple(images.shape[2:]))
        visible = visible_mask_grid(visible_ids, unit_grid)
        voxel_visible = expand_units(visible, self.config.total_stride)[:, None]
        tokens = self.encoder.patch_embed(Tokens.from_grid(images * voxel_visible, plan.input))
        tokens_per_unit = tuple(g // u for g, u in zip(tokens.grid, unit_grid))
        token_visible = expand_units(visible, tokens_per_unit).reshape(-1, 1)  # dense C order, like tokens
        tokens = tokens.with_features(torch.where(token_visible, tokens.features, self.embed_mask_token))
        last = self.encoder.forward_stages(tokens)[-1]
        return last.to_grid().flatten(2).transpose(1, 2)

    def forward_decoder(self, features: Tensor, visible_ids: Tensor, unit_grid: Triple) -> Tensor:
        """(B, N, C_last) -> predicted voxels of every unit (B, N, prod(unit) * C)."""
        visible = visible_mask_grid(visible_ids, unit_grid).flatten(1)
        if self.encoder_mode == "dense":
            visible = torch.ones_like(visible)  # every unit was encoded (masked ones from mask tokens)
        return self.decoder(features, visible, unit_grid)

    def forward_loss(self, images: Tensor, prediction: Tensor, visible_ids: Tensor) -> Tensor:
        """Mean squared error over the voxels of masked units; per-unit normalised targets optionally."""
        target = patchify(images, self.config.total_stride)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        unit_grid = self.encoder.unit_grid(tuple(images.shape[2:]))
        masked = ~visible_mask_grid(visible_ids, unit_grid).flatten(1)  # [B, N]
        per_unit = (prediction.float() - target.float()).square().mean(-1)
        return (per_unit * masked).sum() / masked.sum().clamp(min=1)

    def forward(
        self, images: Tensor, visible_ids: Tensor, plan: EncoderPlan | None = None
    ) -> tuple[Tensor, Tensor]:
        """images (B, C, Z, Y, X), a multiple of the mask unit; visible_ids (B, K); ``plan``: see
        :meth:`plan` (made here when not given).

        Returns (loss, prediction (B, N, prod(unit) * C)).
        """
        unit_grid = self.encoder.unit_grid(tuple(images.shape[2:]))
        features = self.forward_encoder(images, visible_ids, plan)
        prediction = self.forward_decoder(features, visible_ids, unit_grid)
        return self.forward_loss(images, prediction, visible_ids), prediction


def expand_units(unit_values: Tensor, unit: Triple) -> Tensor:
    """(B, uz, uy, ux) -> (B, uz*Uz, uy*Uy, ux*Ux): repeat every unit's value over its voxels/tokens."""
    for axis, size in enumerate(unit, start=1):
        unit_values = unit_values.repeat_interleave(size, dim=axis)
    return unit_values
