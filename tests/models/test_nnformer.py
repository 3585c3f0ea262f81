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
