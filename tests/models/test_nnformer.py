"""nnFormer model: parameter counts, any-size inputs, gradients, relative position index."""

import pytest
import torch

from maeformer_fast.models import NNFormer, NNFormerEncoder, get_config
from maeformer_fast.models.tokens import stage_window
from maeformer_fast.ops import bias_table_size, relative_position_index
from maeformer_fast.ops.window_groups import official_to_correct_rows


@pytest.mark.parametrize(
    ("name", "official"), [("synapse", 150_054_210), ("acdc", 37_160_200), ("tumor", 37_606_726)]
)
def test_published_configs_have_the_official_parameter_counts(name, official):
    """To the parameter, as counted from the official classes with the official trainers' arguments
    (tests/fixtures/official/README.md). Catches acdc's first downsampling as 3x3x3 (tried: 37,491,976)
    and tumor's decoder with the encoder's heads (tried: no ``decoder_heads``: 37,519,552)."""
    with torch.device("meta"):
        model = NNFormer(get_config(name))
    assert sum(p.numel() for p in model.parameters()) == official


def test_json_list_overrides_build_the_same_model_as_tuples():
    """Overrides read from JSON (a study's encoder layout, a saved config) come as lists; the model
    must train with them as with tuples (lists once reached a memoised bias lookup: TypeError)."""
    lists = {"depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_sizes": [[4, 4, 4]] * 3}
    tuples = {"depths": (2, 2, 2), "num_heads": (2, 4, 8), "window_sizes": ((4, 4, 4),) * 3}
    assert get_config("small", **lists) == get_config("small", **tuples)
    torch.manual_seed(0)
    model = NNFormer(get_config("small", **lists)).train()
    model(torch.randn(1, 1, 16, 16, 16))[0].sum().backward()


@pytest.mark.parametrize("size", [(13, 37, 22), (32, 48, 32), (1, 1, 1), (17, 16, 33)])
def test_any_input_size_gives_logits_of_that_size(size):
    torch.manual_seed(0)
    model = NNFormer(get_config("small")).eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


def test_acdc_layout_rounds_up_at_strided_layers_and_crops_back():
    """ACDC's official grid arithmetic at its 14-slice crop depth: stage depths 14, 14, 7, 3 (the
    last downsampling reads odd positions), 19 slices (10 at stage 2: even) also work, and
    the logits keep the input size. Catches the odd-phase grid rounding up (tried: ``g // 2`` ->
    ``-(-g // 2)`` in ``_plan_conv``), the odd-phase conv without its far-end padding (tried: one
    slice short at even lengths) and the decoder not cropping to the skip grid (tried: 11 vs 10)."""
    model = NNFormer(get_config("acdc", embed_dim=8, num_heads=(1, 1, 2, 2))).eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 1, 14, 64, 32))
        assert [tuple(f.shape[2:]) for f in features] == [(14, 16, 8), (14, 8, 4), (7, 4, 2), (3, 2, 1)]
        assert model(torch.randn(1, 1, 19, 40, 24)).shape == (1, 4, 19, 40, 24)


def test_deep_supervision_outputs_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = NNFormer(get_config("small", drop_path_rate=0.0)).train()  # no branch may be dropped
    outputs = model(torch.randn(1, 1, 13, 37, 22))
    assert [tuple(o.shape[2:]) for o in outputs] == [(13, 37, 22), (7, 19, 11), (4, 10, 6)]
    sum(o.square().mean() for o in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# The small layout at a tiny width (runs in a fraction of a second); sizes that are not multiples of the
# patch (2) nor of the total stride (16) on most axes, one axis of a single voxel.
TINY = dict(embed_dim=8, num_heads=(1, 1, 2, 2), drop_path_rate=0.0)
ODD_SIZES = [(13, 37, 22), (17, 20, 9), (5, 3, 30), (1, 6, 1)]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_logits_at_odd_sizes_equal_the_input_padded_to_the_patch_then_cropped(size):
    """Zero-pad the input by hand at the far end to a multiple of the patch (what the official
    ``PatchEmbed`` does), run, crop the first ``size`` voxels: the logits equal those of the unpadded
    input, with the embedding's first conv strided by the whole patch (2): its padding-1 zero slice is
    then the padded slice, and every later grid is the same. Measured difference 0.0 (CPU, float32);
    tolerance 1e-5 for other conv algorithms.

    The model does not pad its input (strided layers round up), so other paddings are no reference:
    measured at these sizes, padding to the total stride (16) changes the logits by up to 2.0 (extra
    slices become tokens of their own), and with the default stride-1 first conv even padding to the
    patch does, by up to 1.3 (the padded slice gets the conv's bias before the strided conv reads it).

    Mutation seen failing: ``NNFormer.forward``'s head crop ``[:, :, : crop[0], ...]`` ->
    ``[:, :, -crop[0] :, ...]`` (the far end: up to 2.0 off).
    """
    torch.manual_seed(0)
    model = NNFormer(get_config("small", embed_strides=((2, 2, 2), (1, 1, 1)), **TINY)).eval()
    x = torch.randn(2, 1, *size)
    pad = [(-s) % 2 for s in size]
    padded = torch.nn.functional.pad(x, [0, pad[2], 0, pad[1], 0, pad[0]])
    assert padded.shape[2:] == tuple(s + p for s, p in zip(size, pad))
    with torch.no_grad():
        logits = model(x)
        reference = model(padded)[:, :, : size[0], : size[1], : size[2]]
    assert logits.shape == (2, 3, *size)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def transposed_conv_by_voxel(
    features: torch.Tensor, conv: torch.nn.ConvTranspose3d, size: list[int]
) -> torch.Tensor:
    """A ConvTranspose3d with kernel == stride, written voxel by voxel and cut to ``size``: voxel v of
    the output reads token v // k at tap v % k (so it is the conv's full output cropped from the start).

    features (B, C, *grid) -> (B, O, *size); an index error where ``size`` exceeds the conv's output.
    """
    assert conv.kernel_size == conv.stride and conv.output_padding == (0, 0, 0)
    voxels = [torch.arange(n) for n in size]
    token = [v // k for v, k in zip(voxels, conv.kernel_size)]
    tap = [v % k for v, k in zip(voxels, conv.kernel_size)]
    # Broadcast the three axes' indices to (Z, Y, X).
    f = features[:, :, token[0][:, None, None], token[1][None, :, None], token[2][None, None, :]]
    w = conv.weight[:, :, tap[0][:, None, None], tap[1][None, :, None], tap[2][None, None, :]]
    return torch.einsum("bczyx,cozyx->bozyx", f, w) + conv.bias[:, None, None, None]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_heads_and_upsamplings_keep_the_first_voxels_at_odd_sizes(size):
    """Every deep-supervision head's logits and every decoder upsampling's output equal their
    transposed conv written voxel by voxel (``transposed_conv_by_voxel``) on the features they were
    given, at sizes ceil(size / 2^l) (head l) and the encoder's stage grids ceil(size / 2^(s+1))
    (decoder stage s): both keep the near end of the conv's output. Measured error up to 4.2e-7
    (float32 sums over 8 to 64 channels in another order); tolerance 1e-5.

    Mutation seen failing: the head crop ``[:, :, : crop[0], ...]`` -> ``[:, :, -crop[0] :, ...]``
    (heads: up to 2.9 off) and ``Upsample``'s ``up[:, :, : grid[0], ...]`` -> ``up[:, :, -grid[0] :,
    ...]`` (upsamplings: up to 1.6 off).
    """
    torch.manual_seed(0)
    model = NNFormer(get_config("small", **TINY)).train()  # train: all three deep-supervision heads
    head_inputs, up_inputs, up_outputs = {}, {}, {}
    for level, head in enumerate(model.heads):
        head.register_forward_pre_hook(lambda m, args, level=level: head_inputs.update({level: args[0]}))
    for k, stage in enumerate(model.decoder):
        up = stage.upsample
        up.up.register_forward_pre_hook(lambda m, args, k=k: up_inputs.update({k: args[0]}))
        up.register_forward_hook(lambda m, args, out, k=k: up_outputs.update({k: out}))
    with torch.no_grad():
        logits = model(torch.randn(2, 1, *size))
    assert len(logits) == len(head_inputs) == 3 and len(up_outputs) == 3
    for level, out in enumerate(logits):
        expected = [-(-s // 2**level) for s in size]
        reference = transposed_conv_by_voxel(head_inputs[level], model.heads[level], expected)
        torch.testing.assert_close(
            out, reference, atol=1e-5, rtol=0, msg=lambda m, lv=level: f"head {lv}: {m}"
        )
    for k, stage in enumerate(model.decoder):
        resolution = len(model.decoder) - 1 - k  # decoder stages run from the deepest resolution up
        grid = [-(-s // 2 ** (resolution + 1)) for s in size]
        reference = transposed_conv_by_voxel(up_inputs[k], stage.upsample.up, grid)
        torch.testing.assert_close(
            up_outputs[k], reference, atol=1e-5, rtol=0, msg=lambda m, k=k: f"decoder stage {k}: {m}"
        )


def test_padding_does_not_leak_between_samples():
    torch.manual_seed(0)
    model = NNFormer(get_config("small")).eval()
    x = torch.randn(2, 1, 20, 20, 20)
    with torch.no_grad():
        both = model(x)
        first = model(x[:1])
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)


def test_encoder_returns_per_stage_features():
    config = get_config("small")
    encoder = NNFormerEncoder(config).eval()
    with torch.no_grad():
        features = encoder(torch.randn(1, 1, 32, 48, 32))
    assert [tuple(f.shape) for f in features] == [
        (1, 32, 16, 24, 16),
        (1, 64, 8, 12, 8),
        (1, 128, 4, 6, 4),
        (1, 256, 2, 3, 2),
    ]


@pytest.mark.parametrize("window", [(4, 4, 4), (3, 5, 5), (7, 10, 10), (2, 1, 3)])
def test_relative_position_index_is_a_bijection_over_offsets(window):
    axes = [torch.arange(-(w - 1), w) for w in window]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    rows = relative_position_index(offsets, window)
    assert sorted(rows.tolist()) == list(range(bias_table_size(window)))


def upstream_official_index(window: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """nnFormer's ``relative_position_index`` transcribed from the official code, per token pair of one
    window: (official row (N, N), offset (N, N, 3))."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative = offsets.clone()
    relative[:, :, 0] += window[0] - 1
    relative[:, :, 1] += window[1] - 1
    relative[:, :, 2] += window[2] - 1
    relative[:, :, 0] *= 3 * window[1] - 1
    relative[:, :, 1] *= 2 * window[1] - 1
    return relative.sum(-1), offsets


@pytest.mark.parametrize("window", [(4, 4, 4), (3, 5, 5), (2, 3, 4)])
def test_official_index_matches_the_upstream_formula_worked_by_hand(window):
    """Catches a changed multiplier or offset in ``official_to_correct_rows`` (tried: ``3 * wy - 1``
    -> ``2 * wy - 1``, and ``+ wx - 1`` -> ``+ wx``): rows are compared with the upstream code's
    formula transcribed here and, for 4x4x4, with rows worked out by hand."""
    upstream, offsets = upstream_official_index(window)
    rows = official_to_correct_rows(window)
    assert torch.equal(rows[relative_position_index(offsets, window)], upstream)
    if window == (4, 4, 4):  # multipliers 11, 7, 1 on offsets shifted by 3; correct rows use 49, 7, 1
        assert rows[171].item() == 57  # offset (0, 0, 0): 3 * 11 + 3 * 7 + 3
        assert rows[0].item() == 0 and rows[342].item() == 114  # (-3, -3, -3) and (3, 3, 3): 6 * 19
        assert rows[49].item() == rows[11].item() == 11  # (-2, -3, -3) and (-3, -2, 1) share row 11


def test_official_index_aliases_offsets_and_flag_reproduces_it():
    rows = official_to_correct_rows((4, 4, 4))
    assert rows.unique().numel() < rows.numel()  # the upstream bug: distinct offsets share a row
    plain = NNFormer(get_config("small", official_bias_index=False))
    official = NNFormer(get_config("small", official_bias_index=True))
    assert plain.state_dict().keys() == official.state_dict().keys()
    attn = official.encoder.stages[0].blocks[0].attn
    torch.testing.assert_close(attn.bias_table(), attn.relative_position_bias_table[rows])
    table = attn.relative_position_bias_table
    assert torch.equal(attn.bias_table()[171], table[57])  # offset (0, 0, 0) reads upstream's row 57
    assert torch.equal(attn.bias_table()[49], table[11]) and torch.equal(attn.bias_table()[11], table[11])


@pytest.mark.parametrize(
    ("grid", "window", "shifted", "expected"),
    [
        ((8, 8, 8), (4, 4, 4), True, ((4, 4, 4), (2, 2, 2))),
        ((8, 8, 8), (4, 4, 4), False, ((4, 4, 4), (0, 0, 0))),
        ((4, 6, 8), (4, 4, 4), True, ((4, 4, 4), (0, 2, 2))),  # z: the window covers the grid exactly
        ((2, 3, 5), (4, 4, 4), True, ((2, 3, 4), (0, 0, 2))),  # clipped to the grid on z and y
        ((10, 5, 4), (3, 5, 5), True, ((3, 5, 4), (1, 0, 0))),  # ACDC's anisotropic window
        ((2, 12, 6), (3, 5, 5), True, ((2, 5, 5), (0, 2, 2))),
        ((5, 20, 10), (7, 10, 10), True, ((5, 10, 10), (0, 5, 0))),
        ((5, 20, 10), (7, 10, 10), False, ((5, 10, 10), (0, 0, 0))),
    ],
)
def test_stage_window_on_hand_worked_grids(grid, window, shifted, expected):
    """Catches a shift where the window covers the grid (tried: ``w < g`` -> ``w <= g``), an unclipped
    window (tried: ``min(w, g)`` -> ``w``) and a shift other than half the window, rounded down
    (tried: ``w // 2`` -> ``(w + 1) // 2``)."""
    assert stage_window(grid, window, shifted) == expected


@pytest.mark.parametrize(
    ("backend", "kernel"), [("reference", "varlen_window_attention"), ("torch", "attend_with_bias")]
)
def test_attention_gets_one_dtype_under_cuda_autocast_rules(monkeypatch, backend, kernel):
    # CUDA autocast runs layer norms in fp32 and Linears in bf16 (CPU autocast keeps layer norms in
    # bf16, so emulate CUDA's rule here). Skip attention's queries are normed tokens with no
    # projection: the Triton kernels (packed windows) and SDPA (windows cut from the dense grid,
    # the torch backend's path) reject them unless they share k and v's dtype.
    import torch.nn.functional as F

    from maeformer_fast.models import blocks

    layer_norm = F.layer_norm

    def layer_norm_in_fp32(x, shape, weight=None, bias=None, eps=1e-5):
        with torch.autocast("cpu", enabled=False):
            return layer_norm(x.float(), shape, weight, bias, eps)

    seen = []

    def attention(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attend(q, k, v, *args, **kwargs)

    attend = getattr(blocks, kernel)
    monkeypatch.setattr(F, "layer_norm", layer_norm_in_fp32)
    monkeypatch.setattr(blocks, kernel, attention)
    config = get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2), attention_backend=backend)
    model = NNFormer(config).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 1, 32, 32, 32))
    assert len(seen) == 14  # 8 encoder blocks, 6 decoder blocks (3 with skip attention)
    assert all(q == k == v == torch.bfloat16 for q, k, v in seen), seen
