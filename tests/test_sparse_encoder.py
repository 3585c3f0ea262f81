"""The visible-only encoder equals the dense masked reference at every visible position."""

import pytest
import torch

from maeformer_fast.models import NNFormerEncoder, get_config
from maeformer_fast.ops.masking import random_unit_mask

from .masked_reference import masked_dense_encoder

# A tiny anisotropic config in the style of ACDC: patch (1, 2, 2), non-cubic windows.
ANISOTROPIC = dict(embed_dim=16, num_heads=(1, 2, 2, 4), patch_size=(1, 2, 2),
                   window_sizes=((2, 3, 3), (2, 3, 3), (3, 5, 5), (2, 3, 3)))  # fmt: skip


def visible_values(dense, tokens):
    """Read a dense (B, C, Z, Y, X) map at the positions of sparse tokens -> (T, C)."""
    return dense[tokens.batch, :, tokens.coords[:, 0], tokens.coords[:, 1], tokens.coords[:, 2]]


@pytest.mark.parametrize(
    ("overrides", "size", "ratio", "seed"),
    [
        ({}, (32, 48, 32), 0.75, 0),
        ({}, (32, 48, 32), 0.5, 1),
        ({}, (48, 32, 16), 0.75, 2),
        ({"embed_dim": 16, "num_heads": (1, 2, 2, 4)}, (16, 32, 48), 0.6, 3),
        (ANISOTROPIC, (8, 32, 48), 0.75, 4),
    ],
)
def test_sparse_encoder_equals_dense_masked_reference(overrides, size, ratio, seed):
    torch.manual_seed(seed)
    encoder = NNFormerEncoder(get_config("small", **overrides)).eval()
    images = torch.randn(2, 1, *size)
    ids = random_unit_mask(2, encoder.unit_grid(size), ratio)
    sparse = encoder.forward_visible(images, ids)
    reference = masked_dense_encoder(encoder, images, ids)
    for stage, (tokens, dense) in enumerate(zip(sparse, reference)):
        torch.testing.assert_close(tokens.features, visible_values(dense, tokens), atol=2e-5, rtol=1e-4,
                                   msg=lambda m, s=stage: f"stage {s}: {m}")  # fmt: skip

    assert_same_gradients(encoder, images, ids, masked_dense_encoder)


def assert_same_gradients(encoder, images, ids, dense_maps):
    """Parameter gradients of a random linear function of the visible tokens, sparse vs the dense maps
    of ``dense_maps(encoder, images, ids)`` read at the same positions. In float64: gradients sum over
    many positions, and there the summation order is invisible."""
    encoder.double()
    images = images.double()
    sparse = encoder.forward_visible(images, ids)
    reference = dense_maps(encoder, images, ids)
    weights = [torch.randn_like(t.features) for t in sparse]
    sparse_loss = sum((t.features * w).sum() for t, w in zip(sparse, weights))
    grads = torch.autograd.grad(sparse_loss, list(encoder.parameters()))
    ref_loss = sum((visible_values(d, t) * w).sum() for t, d, w in zip(sparse, reference, weights))
    ref_grads = torch.autograd.grad(ref_loss, list(encoder.parameters()))
    for (name, _), g, r in zip(encoder.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"grad {n}: {m}")


def test_zero_mask_ratio_equals_plain_dense_encoder():
    torch.manual_seed(0)
    encoder = NNFormerEncoder(get_config("small")).eval()
    images = torch.randn(2, 1, 32, 48, 32)
    ids = random_unit_mask(2, encoder.unit_grid((32, 48, 32)), 0.0)
    for tokens, dense in zip(encoder.forward_visible(images, ids), encoder.forward_tokens(images)):
        torch.testing.assert_close(
            tokens.features, visible_values(dense.to_grid(), tokens), atol=2e-5, rtol=1e-4
        )
    assert_same_gradients(
        encoder, images, ids, lambda enc, x, _ids: [t.to_grid() for t in enc.forward_tokens(x)]
    )


def test_masked_voxels_are_never_read():
    torch.manual_seed(0)
    encoder = NNFormerEncoder(get_config("small")).eval()
    images = torch.randn(1, 1, 32, 48, 32)
    ids = random_unit_mask(1, encoder.unit_grid((32, 48, 32)), 0.75)
    clean = encoder.forward_visible(images, ids)[-1].features
    poisoned = images.clone()
    visible = torch.zeros(12, dtype=torch.bool)
    visible[ids[0]] = True
    for unit in (~visible).nonzero().flatten().tolist():
        z, y, x = unit // 6, (unit // 2) % 3, unit % 2
        poisoned[..., z * 16 : (z + 1) * 16, y * 16 : (y + 1) * 16, x * 16 : (x + 1) * 16] = float("nan")
    torch.testing.assert_close(encoder.forward_visible(poisoned, ids)[-1].features, clean)
