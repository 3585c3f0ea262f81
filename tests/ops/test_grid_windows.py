"""Windows cut from the dense grid (roll + mask, ``ops.grid_windows``) equal the grouped windows of
packed tokens on any grid: shifted, partial at the edges, padded, with skip attention."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from maeformer_fast.models.blocks import GridWindows, TransformerBlock
from maeformer_fast.models.tokens import Tokens, WindowGrouping
from maeformer_fast.ops.grid_windows import from_windows, to_windows, window_mask

# (grid, window, shift) as a stage uses them (shift 0 or half the window, window at most the grid)
CASES = [
    ((8, 8, 8), (4, 4, 4), (2, 2, 2)),
    ((5, 6, 7), (4, 4, 4), (2, 2, 2)),  # padding on every axis, a shifted window over the padding
    ((5, 6, 7), (4, 4, 4), (0, 0, 0)),
    ((6, 10, 9), (3, 5, 5), (1, 2, 2)),
    ((3, 4, 4), (3, 4, 4), (0, 0, 0)),  # one window: no mask at all
    ((9, 4, 6), (4, 4, 4), (2, 0, 2)),  # no shift along an axis the window covers
]


# (grid, the block's window, shifted): the block clips its window to the grid and shifts by half of it
BLOCKS = [
    ((8, 8, 8), (4, 4, 4), True),
    ((5, 6, 7), (4, 4, 4), True),  # padding on every axis, a shifted window over the padding
    ((5, 6, 7), (4, 4, 4), False),
    ((6, 10, 9), (3, 5, 5), True),
    ((3, 4, 4), (4, 4, 4), True),  # the window clipped to the grid (and not shifted) along z
    ((2, 3, 2), (4, 4, 4), False),  # one window smaller than the bias table's
    ((9, 4, 6), (4, 4, 4), True),  # no shift along an axis the window covers
]


def brute_force_mask(grid, window, shift) -> torch.Tensor:
    """Whether two slots of a rolled, padded window hold positions of one unrolled window, padding
    only with padding: slot by slot, by undoing the roll on the padded grid."""
    padded = [-(-g // w) * w for g, w in zip(grid, window)]
    counts = [p // w for p, w in zip(padded, window)]

    def label(window_index, slot):
        cell = []
        for axis in range(3):
            rolled = window_index[axis] * window[axis] + slot[axis]
            original = (rolled + shift[axis]) % padded[axis]  # the roll by -shift moved it here
            if original >= grid[axis]:
                return None  # padding
            cell.append((original + window[axis] - shift[axis]) // window[axis])
        return tuple(cell)

    slots = list(itertools.product(*(range(w) for w in window)))
    masks = []
    for window_index in itertools.product(*(range(n) for n in counts)):
        labels = [label(window_index, slot) for slot in slots]
        masks.append([[a == b for b in labels] for a in labels])
    return torch.tensor(masks)


@pytest.mark.parametrize(("grid", "window", "shift"), CASES)
def test_window_mask_matches_a_slot_by_slot_count(grid, window, shift):
    """Mutations caught: the unrolled cell without the shift (``+ w - s`` -> ``+ w``), and padding
    labelled like real positions (the ``+ 1`` dropped: padding joins cell 0)."""
    mask = window_mask(grid, window, shift, torch.device("cpu"))
    expected = brute_force_mask(grid, window, shift)
    if mask is None:
        assert bool(expected.all())
    else:
        assert torch.equal(mask, expected)


@pytest.mark.parametrize(("grid", "window", "shift"), CASES)
def test_windows_round_trip(grid, window, shift):
    x = torch.randn(2, *grid, 3)
    assert torch.equal(from_windows(to_windows(x, window, shift), grid, window, shift), x)


@pytest.mark.parametrize("skip_attention", [False, True])
@pytest.mark.parametrize(("grid", "window", "shifted"), BLOCKS)
def test_block_on_grid_windows_equals_grouped_windows(grid, window, shifted, skip_attention):
    """A block attending in windows cut from the grid gives the grouped path's output and every
    gradient (reference backend: a loop over groups). Mutations caught: the mask never applied;
    the bias shared by windows and heads in the wrong order (windows-major vs heads-major); bias
    rows indexed with the clipped window instead of the table's (a real bug, found by the sparse
    encoder's test, before the clipped cases were added here)."""
    torch.manual_seed(0)
    dim, heads, batch = 8, 2, 2
    block = TransformerBlock(dim, heads, window, shifted, 2.0, 0.0, skip_attention=skip_attention)
    with torch.no_grad():  # a bias large enough to matter next to the logits
        block.attn.relative_position_bias_table.normal_()
    grouped = copy.deepcopy(block)
    grouped.attn.backend = "reference"
    tokens = Tokens.from_grid(torch.randn(batch, dim, *grid))
    skip = torch.randn_like(tokens.features) if skip_attention else None

    results = []
    for module, kind in ((block, GridWindows), (grouped, WindowGrouping)):
        assert isinstance(module.windows(tokens), kind)
        x = tokens.features.clone().requires_grad_()
        s = None if skip is None else skip.clone().requires_grad_()
        out = module(tokens.with_features(x), skip=s).features
        out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
        grads = {n: p.grad for n, p in module.named_parameters()}
        results.append((out, x.grad, None if s is None else s.grad, grads))
    (out, dx, ds, grads), (out_ref, dx_ref, ds_ref, grads_ref) = results
    assert_close_scaled(out, out_ref)
    assert_close_scaled(dx, dx_ref)
    if skip_attention:
        assert_close_scaled(ds, ds_ref)
    for name, grad in grads_ref.items():
        assert_close_scaled(grads[name], grad, name)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal up to fp32 rounding: the largest difference at most 5e-6 of the largest magnitude
    (fp32 against the reference's fp32 loop: measured at most 1.0e-6 over these cases; a weight
    gradient sums hundreds of products, so element-wise relative errors mean little)."""
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error <= 5e-6, f"{name}: largest difference {error:.2e} of the largest magnitude"


@pytest.mark.parametrize(("backend", "from_grid"), [("torch", True), ("reference", False)])
def test_the_plan_groups_exactly_where_the_blocks_do_not_cut_the_grid(backend, from_grid):
    """The plan skips the sort of a dense stage exactly when its blocks cut windows from the grid, and
    groups it where they read a grouping: otherwise every block would sort on every call. Mutation
    caught: the plan grouping every stage regardless (groupings where the blocks never read them)."""
    from maeformer_fast.models.config import get_config
    from maeformer_fast.models.nnformer import NNFormer

    model = NNFormer(get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2), attention_backend=backend))
    plan = model.encoder.plan(1, (32, 48, 32), "cpu")
    for stage, layout in zip(model.encoder.stages, plan.stages):
        tokens = Tokens(torch.zeros(layout.coords.shape[0], 8), layout)
        kinds = {type(block.windows(tokens)) for block in stage.blocks}
        assert kinds == {GridWindows if from_grid else WindowGrouping}
        assert bool(layout.groupings) != from_grid
