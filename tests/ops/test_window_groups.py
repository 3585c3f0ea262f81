"""window_groups: the sort order and group offsets are consistent, and every group fits in a window."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maeformer_fast.ops import window_groups
from maeformer_fast.types import as_triple


def grid_tokens(grid, batch_size, keep, seed):
    """Coordinates (T, 3) and batch (T,) of a random subset (fraction ``keep``) of a dense grid."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.arange(n) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    coords = coords.repeat(batch_size, 1)
    batch = torch.arange(batch_size).repeat_interleave(coords.shape[0] // batch_size)
    chosen = torch.rand(coords.shape[0], generator=gen) < keep
    return coords[chosen], batch[chosen]


def check_groups(coords, batch, window, shift):
    order, cu = window_groups(coords, batch, window, shift)
    num_tokens = coords.shape[0]
    assert order.dtype == torch.long and cu.dtype == torch.int32
    assert torch.equal(order.sort().values, torch.arange(num_tokens))  # a permutation
    assert cu[0] == 0 and cu[-1] == num_tokens
    lengths = cu[1:] - cu[:-1]
    assert bool((lengths > 0).all()), "only non-empty groups are listed"
    w = torch.tensor(as_triple(window))
    s = torch.tensor(as_triple(shift))
    cells = torch.div(coords[order] + (w - s), w, rounding_mode="floor")
    seen = set()
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        c = coords[order[start:end]]
        key = (int(batch[order[start]]), *cells[start].tolist())
        assert key not in seen, "a window is split into two groups"
        seen.add(key)
        assert bool((batch[order[start:end]] == key[0]).all())
        assert bool((cells[start:end] == cells[start]).all())
        span = c.amax(0) - c.amin(0)
        assert bool((span < w).all()), f"group spans {span.tolist()} >= window {w.tolist()}"
        assert bool((order[start:end].diff() > 0).all()), "input order is kept inside a group"
    return order, cu


@pytest.mark.parametrize(
    ("grid", "window", "shift"),
    [
        ((13, 11, 9), (4, 4, 4), (2, 2, 2)),
        ((13, 11, 9), (3, 5, 5), (1, 2, 2)),
        ((8, 8, 8), (4, 4, 4), (0, 0, 0)),
        ((5, 6, 7), (8, 8, 8), (0, 0, 0)),
    ],
)
def test_groups_are_consistent(grid, window, shift):
    coords, batch = grid_tokens(grid, batch_size=2, keep=0.6, seed=0)
    check_groups(coords, batch, window, shift)


def test_dense_divisible_grid_gives_full_windows():
    coords, batch = grid_tokens((8, 8, 8), batch_size=2, keep=1.0, seed=0)
    _, cu = check_groups(coords, batch, 4, 0)
    assert torch.equal(cu.diff(), torch.full((16,), 64, dtype=torch.int32))


def test_shifted_dense_grid_counts():
    # Shift 2 of window 4 on 8 cells: windows start at -2, 2, 6 -> per-axis sizes 2, 4, 2.
    coords, batch = grid_tokens((8, 8, 8), batch_size=1, keep=1.0, seed=0)
    _, cu = check_groups(coords, batch, 4, 2)
    sizes = torch.tensor([2, 4, 2])
    expected = (sizes[:, None, None] * sizes[None, :, None] * sizes[None, None, :]).flatten()
    assert torch.equal(cu.diff().long(), expected)


def test_empty_input_and_bad_shift():
    order, cu = window_groups(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4, 2)
    assert order.numel() == 0 and cu.tolist() == [0]
    coords, batch = grid_tokens((4, 4, 4), 1, 1.0, 0)
    with pytest.raises(ValueError, match="shift"):
        window_groups(coords, batch, 4, 4)


@settings(max_examples=25, deadline=None)
@given(
    grid=st.tuples(*[st.integers(1, 12)] * 3),
    window=st.tuples(*[st.integers(1, 6)] * 3),
    shift_frac=st.tuples(*[st.floats(0, 0.99)] * 3),
    keep=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_groups_property(grid, window, shift_frac, keep, seed):
    shift = tuple(int(f * w) for f, w in zip(shift_frac, window))
    coords, batch = grid_tokens(grid, batch_size=2, keep=keep, seed=seed)
    check_groups(coords, batch, window, shift)


def test_padded_offsets_extend_the_exact_ones_with_empty_groups():
    torch.manual_seed(0)
    coords = torch.randint(0, 11, (300, 3))
    batch = torch.randint(0, 2, (300,))
    order, exact = window_groups(coords, batch, (4, 4, 4), (2, 2, 2), pad_groups=False)
    padded_order, padded = window_groups(coords, batch, (4, 4, 4), (2, 2, 2), pad_groups=True)
    assert torch.equal(order, padded_order)
    assert padded.numel() == 301
    assert torch.equal(padded[: exact.numel()], exact)
    assert bool((padded[exact.numel() :] == 300).all())
