"""Dense masked encoder: the obviously-right semantics the sparse MAE encoder must reproduce.

The dense encoder runs on every position; masked positions are set to zero at the input of every
layer and attention only uses visible keys of the same window. Written independently of the sparse
path (dense convs on zeroed grids, a per-window loop with a key mask).
"""

import torch
import torch.nn.functional as F

from maeformer_fast.models.mae import expand_units
from maeformer_fast.models.tokens import Tokens
from maeformer_fast.ops import relative_position_index
from maeformer_fast.ops.masking import visible_mask_grid


def channels_last(module, x):
    return module(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


def masked_attention_block(block, x, mask):
    """x: (B, C, Z, Y, X) dense, mask: (B, Z, Y, X) bool -> block output (B, C, Z, Y, X)."""
    tokens = Tokens.from_grid(x * mask[:, None])
    grouping, _ = tokens.grouping(block.window_size, block.shifted)
    feats = tokens.features
    t, c = feats.shape
    attn = block.attn
    h = attn.num_heads
    q, k, v = attn.qkv(block.norm1(feats)).view(t, 3, h, c // h).unbind(1)
    visible = mask.reshape(-1)
    out = torch.zeros_like(q)
    bounds = grouping.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        idx = grouping.order[start:end]
        keys = idx[visible[idx]]
        if keys.numel() == 0:
            continue
        rel = tokens.coords[idx][:, None] - tokens.coords[keys][None]
        bias = attn.bias_table()[relative_position_index(rel, attn.window_size)].permute(2, 0, 1)
        logits = torch.einsum("ihd,jhd->hij", q[idx], k[keys]) / (c // h) ** 0.5 + bias
        out[idx] = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v[keys])
    y = feats + attn.proj(out.reshape(t, c))
    y = y + block.mlp(block.norm2(y))
    return tokens.with_features(y).to_grid()


def masked_dense_encoder(encoder, images, visible_ids):
    """Per-stage dense outputs (B, C_i, Z_i, Y_i, X_i); only visible positions are meaningful."""
    unit_grid = encoder.unit_grid(tuple(images.shape[2:]))
    visible = visible_mask_grid(visible_ids, unit_grid)

    def mask_for(x):
        return expand_units(visible, tuple(s // u for s, u in zip(x.shape[2:], unit_grid)))

    x = images
    for layer in encoder.patch_embed.layers:
        x = layer.conv(x * mask_for(x)[:, None])
        if layer.norm is not None:
            x = channels_last(layer.norm, F.gelu(x))
    x = channels_last(encoder.patch_embed.norm, x)
    outputs = []
    for stage in encoder.stages:
        for block in stage.blocks:
            x = masked_attention_block(block, x, mask_for(x))
        outputs.append(channels_last(stage.norm, x))
        if stage.downsample is not None:
            normed = channels_last(stage.downsample.norm, F.gelu(x))
            x = stage.downsample.reduction(normed * mask_for(x)[:, None])
    return outputs
