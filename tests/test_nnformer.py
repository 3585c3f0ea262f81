"""nnFormer model: parameter counts, any-size inputs, gradients, relative position index."""

import pytest
import torch

from maeformer_fast.models import NNFormer, NNFormerEncoder, get_config
from maeformer_fast.ops import bias_table_size, relative_position_index
from maeformer_fast.ops.window_groups import official_to_correct_rows


@pytest.mark.parametrize(("name", "millions"), [("synapse", 150.5), ("acdc", 37.0), ("tumor", 38.0)])
def test_published_configs_match_official_parameter_counts(name, millions):
    with torch.device("meta"):
        model = NNFormer(get_config(name))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.03)


@pytest.mark.parametrize("size", [(13, 37, 22), (32, 48, 32), (1, 1, 1), (17, 16, 33)])
def test_any_input_size_gives_logits_of_that_size(size):
    torch.manual_seed(0)
    model = NNFormer(get_config("small")).eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


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


def test_official_index_aliases_offsets_and_flag_reproduces_it():
    rows = official_to_correct_rows((4, 4, 4))
    assert rows.unique().numel() < rows.numel()  # the upstream bug: distinct offsets share a row
    plain = NNFormer(get_config("small", official_bias_index=False))
    official = NNFormer(get_config("small", official_bias_index=True))
    assert plain.state_dict().keys() == official.state_dict().keys()
    attn = official.encoder.stages[0].blocks[0].attn
    torch.testing.assert_close(attn.bias_table(), attn.relative_position_bias_table[rows])


def test_attention_gets_one_dtype_under_cuda_autocast_rules(monkeypatch):
    # CUDA autocast runs layer norms in fp32 and Linears in bf16 (CPU autocast keeps layer norms in
    # bf16, so emulate CUDA's rule here). Skip attention's queries are normed tokens with no
    # projection: the Triton kernels reject them unless they share k and v's dtype.
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

    attend = blocks.varlen_window_attention
    monkeypatch.setattr(F, "layer_norm", layer_norm_in_fp32)
    monkeypatch.setattr(blocks, "varlen_window_attention", attention)
    model = NNFormer(get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2))).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 1, 32, 32, 32))
    assert len(seen) == 14  # 8 encoder blocks, 6 decoder blocks (3 with skip attention)
    assert all(q == k == v == torch.bfloat16 for q, k, v in seen), seen
