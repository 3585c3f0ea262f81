"""Counted FLOPs of the custom ops: their registered formulas against hand-worked counts and against what
FlopCounterMode counts for the torch backend, and one sparse MAE step counted alike on both backends.

The hand-worked attention case: window (1, 2, 3) (volume 6, not a power of two), groups of 6 tokens in
window raster order (the shared-bias batch: L = 6, 36 pairs), the same 6 cells in reverse order
(a power-of-two bucket: L = 8, 64 pairs), 3 tokens (L = 4, 16 pairs), none, and 1 token (1 pair):
117 pairs per head. With H = 2 heads, D = 4 and D_v = 6 the forward's two matmuls count
2 * 117 * 2 * (4 + 6) = 4680 FLOPs, autograd's backward twice that, 9360.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from maeformer_fast.bench.flops import step_flops
from maeformer_fast.ops import window_attention as wa
from maeformer_fast.ops.sparse_conv import (
    halo_index,
    neighbour_table,
    transposed_table,
    unit_block_conv3d,
    unit_lookup,
)

from ..triton_support import DEVICE, needs_triton, run_triton_tests_in_interpreter

WINDOW = (1, 2, 3)
HAND_PAIRS = 36 + 64 + 16 + 0 + 1
HAND_FORWARD, HAND_BACKWARD = 4680, 9360


def hand_case() -> tuple[torch.Tensor, ...]:
    """q (16, 2, 4), k, v (16, 2, 6), coords, cu_seqlens and bias table of the module docstring's groups."""
    gen = torch.Generator().manual_seed(0)
    cells = [(0, y, x) for y in range(2) for x in range(3)]  # raster order of the (1, 2, 3) window
    groups = [
        [(5 + z, 10 + y, 20 + x) for z, y, x in cells],
        [(7 + z, y, x) for z, y, x in reversed(cells)],
        [(0, 0, 0), (0, 1, 2), (0, 0, 1)],
        [],
        [(3, 3, 3)],
    ]
    coords = torch.tensor([c for g in groups for c in g])
    cu = torch.tensor([0, *torch.tensor([len(g) for g in groups]).cumsum(0).tolist()], dtype=torch.int32)
    q, k = (torch.randn(16, 2, 4, generator=gen) for _ in range(2))
    v = torch.randn(16, 2, 6, generator=gen)
    table = torch.randn(1 * 3 * 5, 2, generator=gen)
    return q, k, v, coords, cu, table


def counted(fn, *leaves: torch.Tensor) -> FlopCounterMode:
    """FlopCounterMode around fn(*leaves) and the backward of its sum."""
    with FlopCounterMode(display=False) as counter:
        fn(*leaves).sum().backward()
    return counter


def test_attention_formula_counts_what_the_torch_backend_counts():
    """The hand-worked pairs and FLOPs (module docstring) from the formula, from FlopCounterMode around
    the eager torch backend (its matmuls) and from the custom op's registered formulas (forward and
    backward op each). Mutation seen failing: ``counted_pairs`` without the buckets' padding (the sum of
    the real lengths squared: "assert 82 == 117")."""
    q, k, v, coords, cu, table = hand_case()
    assert wa.counted_pairs(coords, cu, WINDOW) == HAND_PAIRS
    assert wa.attention_flops(HAND_PAIRS, 2, 4, 6) == HAND_FORWARD
    assert wa.attention_flops(HAND_PAIRS, 2, 4, 6, backward=True) == HAND_BACKWARD

    def leaves():
        return [t.clone().requires_grad_() for t in (q, k, v, table)]

    def eager(q, k, v, table):
        return wa.varlen_window_attention(q, k, v, coords, cu, table, WINDOW, 0.5, backend="torch")

    def op(q, k, v, table):
        return wa.window_attention_op(q, k, v, coords, cu, table, WINDOW, 0.5, "torch")

    assert counted(eager, *leaves()).get_total_flops() == HAND_FORWARD + HAND_BACKWARD
    by_op = counted(op, *leaves()).get_flop_counts()["Global"]
    assert dict(by_op) == {
        torch.ops.maeformer.varlen_window_attention: HAND_FORWARD,
        torch.ops.maeformer.varlen_window_attention_backward: HAND_BACKWARD,
    }


def test_attention_formula_without_data_counts_full_windows():
    """On meta tensors (as inductor hands a formula fake tensors to estimate a node's cost) the groups
    are unknown: every token counts a full window, 16 tokens x 6 = 96 pairs, 2 * 96 * 2 * 10 = 3840
    forward FLOPs, where reading the groups would fail. Mutation seen failing: no fake-tensor branch
    in ``counted_pairs`` (NotImplementedError from ``torch.nonzero``'s meta function)."""
    q, k, v, coords, cu, table = (t.to("meta") for t in hand_case())
    with FlopCounterMode(display=False) as counter:
        wa.window_attention_op(q, k, v, coords, cu, table, WINDOW, 0.5, "torch")
    assert counter.get_total_flops() == 2 * 16 * 6 * 2 * (4 + 6) == 3840


def two_units() -> tuple[torch.Tensor, ...]:
    """Two neighbouring visible units of 2 x 2 x 2 tokens (stride 1: 16 outputs), 3 -> 5 channels:
    features, halo index, neighbour table, transposed table, weight, bias."""
    batch, corner = torch.zeros(2, dtype=torch.long), torch.tensor([[0, 0, 0], [0, 0, 1]])
    lookup = unit_lookup(batch, corner, 1, (1, 1, 2))
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(16, 3, generator=gen)
    halo = halo_index(batch, corner, lookup, (2, 2, 2), (1, 1, 1), 16)
    table = neighbour_table(batch, corner, lookup, (2, 2, 2), (1, 1, 1))
    weight, bias = torch.randn(5, 3, 3, 3, 3, generator=gen), torch.randn(5, generator=gen)
    return features, halo, table, transposed_table(table, 16), weight, bias


@pytest.mark.parametrize("input_grad", [True, False])
def test_sparse_conv_formula_counts_what_the_block_form_counts(input_grad):
    """16 outputs x 27 taps x 3 x 5 channels: 2 * 16 * 27 * 15 = 12960 FLOPs forward, as many for the
    weight gradient and again for the input gradient when the input needs one (the first conv, reading
    images, does not). FlopCounterMode counts that for the CPU block form (its conv3d and conv
    backward) and, through the registered formulas, for the Triton op, run here on meta tensors (its
    fake: the formulas need no kernel). Mutation seen failing: the backward formula counting the input
    gradient always (``passes = 2``: the backward op counted 25920 where the block form's conv backward
    counts 12960)."""
    features, halo, table, transposed, weight, bias = two_units()
    forward = 2 * 16 * 27 * 3 * 5
    assert forward == 12960
    want = forward * (3 if input_grad else 2)

    def block(x, w):
        return unit_block_conv3d(x, halo, w, bias, (1, 1, 1))

    x, w = features.clone().requires_grad_(input_grad), weight.clone().requires_grad_()
    assert counted(block, x, w).get_total_flops() == want
    meta = {name: t.to("meta") for name, t in zip(("table", "transposed", "bias"), (table, transposed, bias))}

    def op(x, w):  # the op itself: autocast, which sparse_conv3d consults, knows no meta device
        return torch.ops.maeformer.sparse_conv3d(x, meta["table"], meta["transposed"], w, meta["bias"])

    x, w = features.to("meta").requires_grad_(input_grad), weight.to("meta").requires_grad_()
    assert dict(counted(op, x, w).get_flop_counts()["Global"]) == {
        torch.ops.maeformer.sparse_conv3d: forward,
        torch.ops.maeformer.sparse_conv3d_backward: want - forward,
    }


# ---------------------------------------------------------------------------------------------------
# The Triton backend (CUDA, or the interpreter in a child process)


def test_triton_kernels_in_interpreter():
    run_triton_tests_in_interpreter(__file__)


@needs_triton
@pytest.mark.skipif(
    DEVICE == "cuda",
    reason="on CUDA the MAE decoder's attention (SDPA) is counted, while torch 2.13 has no FLOP formula "
    "for the CPU SDPA kernels, so whole-step counts differ by it there; the CPU runs the comparison",
)
def test_triton_sparse_mae_step_counts_the_torch_backends_flops():
    """One sparse MAE step (2 stages, patch 1, an 8^3 crop, 2 samples at mask ratio 0.75: ragged
    window groups in power-of-two buckets, the first conv without an input gradient) counts exactly
    the same FLOPs with Triton attention and convs as with the torch backend on the CPU (measured:
    312,266,304 both; the encoder's attention and convs are ~2% of it, the MAE decoder the rest).
    Mutations seen failing: eager Triton attention without the op while counting (``_flops_counted``
    route dropped: 311,537,664, its 728,640 attention FLOPs missing), the conv backward formula
    counting the input gradient always (``passes = 2``: 312,321,600). Runs ~14 s under the interpreter."""
    tiny = {
        "embed_dim": 8,
        "num_heads": (1, 2),
        "depths": (1, 1),
        "window_sizes": ((4, 4, 4), (2, 2, 2)),
        "patch_size": (1, 1, 1),
    }

    def counted(backend: str) -> int:  # crop 8^3, batch 2, 1 channel, 3 classes, mask ratio 0.75
        overrides = {**tiny, "attention_backend": backend, "conv_backend": backend}
        return step_flops("small", overrides, (8, 8, 8), 2, 1, 3, 0.75)

    assert counted("triton") == counted("torch")
