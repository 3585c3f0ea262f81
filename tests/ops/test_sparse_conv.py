"""Sparse 3x3x3 convolution over visible mask units against dense ``F.conv3d`` on the masked grid.

The reference zero-fills the masked units of a dense grid, convolves it with ``F.conv3d`` (padding 1)
and reads the outputs at the visible units' positions; tables are checked against a brute-force loop
over a dense grid of token ids. The Triton kernels run under the interpreter on CPU (tiny shapes).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from maeformer_fast.ops.sparse_conv import (
    halo_index,
    neighbour_table,
    sparse_conv3d,
    sparse_conv3d_reference,
    transposed_table,
    unit_block_conv3d,
    unit_lookup,
)

from ..triton_support import DEVICE, needs_triton, run_triton_tests_in_interpreter


class Case:
    """Visible units of a random mask, their tokens unit by unit, and the dense masked grid."""

    def __init__(self, batch_size, unit_grid, unit_size, stride, visible, c_in, c_out, seed, dtype):
        gen = torch.Generator().manual_seed(seed)
        self.unit_size, self.stride = unit_size, stride
        flat = visible.nonzero()  # [N, 4] (b, uz, uy, ux), storage order = C order of (b, unit)
        self.unit_batch, self.unit_corner = flat[:, 0], flat[:, 1:]
        self.lookup = unit_lookup(self.unit_batch, self.unit_corner, batch_size, unit_grid)
        per_unit = unit_size[0] * unit_size[1] * unit_size[2]
        self.num_inputs = flat.shape[0] * per_unit
        self.features = torch.randn(self.num_inputs, c_in, generator=gen, dtype=dtype)
        self.weight = torch.randn(c_out, c_in, 3, 3, 3, generator=gen, dtype=dtype) / (27 * c_in) ** 0.5
        self.bias = torch.randn(c_out, generator=gen, dtype=dtype)
        self.grid = tuple(g * u for g, u in zip(unit_grid, unit_size))
        self.batch_size = batch_size
        # Token ids of the dense grid, built by loops: -1 where masked.
        self.ids = torch.full((batch_size, *self.grid), -1, dtype=torch.long)
        locals_ = list(itertools.product(*[range(u) for u in unit_size]))  # C order inside a unit
        for n, (b, *corner) in enumerate(flat.tolist()):
            for i, local in enumerate(locals_):
                z, y, x = (c * u + l for c, u, l in zip(corner, unit_size, local))
                self.ids[b, z, y, x] = n * per_unit + i
        out_unit = tuple(u // s for u, s in zip(unit_size, stride))
        self.out_positions = [
            (b, *(c * o + l for c, o, l in zip(corner, out_unit, local)))
            for b, *corner in flat.tolist()
            for local in itertools.product(*[range(o) for o in out_unit])
        ]

    def dense(self, features):
        """(B, C, Z, Y, X): the token features where visible, zero elsewhere."""
        rows = torch.cat([features, features.new_zeros(1, features.shape[1])])
        return rows[self.ids].permute(0, 4, 1, 2, 3)  # ids -1 read the zero row

    def reference(self, features, weight, bias):
        """Dense conv of the masked grid, read at the visible outputs: (T_out, C_out)."""
        out = F.conv3d(self.dense(features), weight, bias, stride=self.stride, padding=1)
        index = torch.tensor(self.out_positions).T
        return out[index[0], :, index[1], index[2], index[3]]

    def brute_force_table(self):
        """(T_out, 27) by loops: the id at stride * o + d - 1, -1 where masked or outside."""
        rows = []
        for b, *o in self.out_positions:
            row = []
            for d in itertools.product(range(3), repeat=3):
                p = [s * oo + dd - 1 for s, oo, dd in zip(self.stride, o, d)]
                inside = all(0 <= pp < g for pp, g in zip(p, self.grid))
                row.append(int(self.ids[b, p[0], p[1], p[2]]) if inside else -1)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.int32)

    def table(self):
        return neighbour_table(self.unit_batch, self.unit_corner, self.lookup, self.unit_size, self.stride)

    def halo(self):
        return halo_index(
            self.unit_batch, self.unit_corner, self.lookup, self.unit_size, self.stride, self.num_inputs
        )


@st.composite
def cases(draw, max_units: int = 3, max_out: int = 3, max_channels: int = 20):
    """Strides 1/2 per axis (anisotropic included), 1..max_out outputs per unit and axis, any mask."""
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(3))
    unit_size = tuple(s * draw(st.integers(1, max_out)) for s in stride)
    unit_grid = tuple(draw(st.integers(1, max_units)) for _ in range(3))
    batch_size = draw(st.integers(1, 2))
    total = batch_size * unit_grid[0] * unit_grid[1] * unit_grid[2]
    bits = draw(st.lists(st.booleans(), min_size=total, max_size=total).filter(any))
    visible = torch.tensor(bits).view(batch_size, *unit_grid)
    c_in, c_out = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    return batch_size, unit_grid, unit_size, stride, visible, c_in, c_out, draw(st.integers(0, 999))


def value_and_grads(fn, case, *inputs, cotangent_seed=0):
    """fn(*inputs) and the gradients of <fn, g> for a fixed random cotangent g, per input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(cotangent_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, g.to(out.device, out.dtype))
    return out, grads


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_tables_equal_brute_force(args):
    """Mutation caught: an off-by-one in the halo (``local - 1`` dropped in neighbour_table) or a
    wrong neighbouring unit (``shift`` with truncating instead of floor division)."""
    case = Case(*args, dtype=torch.float64)
    table = case.table()
    torch.testing.assert_close(table, case.brute_force_table(), rtol=0, atol=0)
    # The transposed table inverts it: (i, k) -> t exactly where table[t, k] == i.
    transposed = transposed_table(table, case.num_inputs)
    t, k = (table >= 0).nonzero().T
    assert (transposed[table[t, k].long(), k] == t).all()
    assert int((transposed >= 0).sum()) == t.numel()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_torch_paths_equal_dense_conv_float64(args):
    """Block form (the CPU path) and the 27-neighbour gather equal the dense masked conv, forward and
    all gradients, to 1e-9 in float64. Mutation caught: a halo that reads the zero row one token too
    early (``halo_index`` local offset - 2), or gradients lost at unit borders (halo built per unit
    with every neighbour unit treated as masked)."""
    case = Case(*args, dtype=torch.float64)
    want, want_grads = value_and_grads(case.reference, case, case.features, case.weight, case.bias)
    halo, table = case.halo(), case.table()
    paths = {
        "block form": lambda x, w, b: unit_block_conv3d(x, halo, w, b, case.stride),
        "gather": lambda x, w, b: sparse_conv3d_reference(x, table, w, b),
    }
    for name, fn in paths.items():
        got, grads = value_and_grads(fn, case, case.features, case.weight, case.bias)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
        for what, g, r in zip(("features", "weight", "bias"), grads, want_grads):
            torch.testing.assert_close(
                g, r, atol=1e-9, rtol=1e-9, msg=lambda m, n=name, w=what: f"{n} d{w}: {m}"
            )


def test_all_visible_and_single_unit_on_the_border():
    """Hand-picked corners of the space: every unit visible (the dense conv, border padding only) and
    a single visible unit in a volume corner (every halo read is a zero)."""
    everything = torch.ones(2, 2, 2, 3, dtype=torch.bool)
    corner = torch.zeros(1, 2, 3, 2, dtype=torch.bool)
    corner[0, 1, 2, 1] = True
    for visible, stride in ((everything, (2, 1, 2)), (corner, (1, 1, 1)), (corner, (2, 2, 2))):
        unit_size = tuple(2 * s for s in stride)
        case = Case(
            visible.shape[0], tuple(visible.shape[1:]), unit_size, stride, visible, 3, 5, 0, torch.float64
        )
        got = unit_block_conv3d(case.features, case.halo(), case.weight, case.bias, stride)
        torch.testing.assert_close(
            got, case.reference(case.features, case.weight, case.bias), atol=1e-9, rtol=0
        )


# ---------------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or the interpreter in a child process)


def test_triton_kernels_in_interpreter():
    run_triton_tests_in_interpreter(__file__)


# fp32 kernels against the float64 dense conv: |error| <= 1e-5 (1 + |reference|); see the fp32 test.
FP32_TOLERANCE = 1e-5


def triton_conv(case):
    table = case.table().to(DEVICE)
    transposed = transposed_table(table, case.num_inputs)
    return lambda x, w, b: sparse_conv3d(x, table, transposed, w, b)


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@needs_triton
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_units=2, max_out=2, max_channels=40))
@example((2, (2, 2, 2), (2, 2, 2), (1, 1, 1), torch.ones(2, 2, 2, 2, dtype=torch.bool), 3, 5, 0))  # 2 slices
def test_triton_sparse_conv_fp32(args):
    """Forward and the three gradients in fp32 against the float64 dense conv, to atol = rtol = 1e-5:
    |error| <= 1e-5 (1 + |reference|). Measured under the interpreter, max |error| / (1 + |reference|):
    2.4e-6 over 150 drawn cases and this example, 5.6e-6 on the largest cases the strategy can draw
    (2 samples of 8 visible units, 40 -> 40 channels, strides 1, 2 and (2, 1, 2); absolute errors up
    to 2.8e-5 there, where the reference values are large). Channel counts up to 40 cross the
    kernels' 16/32-channel blocks. Mutation caught: the input gradient read through ``table`` instead
    of the transposed table, a weight-gradient split that drops the last partial slice (``end`` =
    start + rows_per_split - 1)."""
    case = Case(*args, dtype=torch.float64)
    want, want_grads = value_and_grads(case.reference, case, case.features, case.weight, case.bias)
    inputs = on_device(*(t.float() for t in (case.features, case.weight, case.bias)))
    got, grads = value_and_grads(triton_conv(case), case, *inputs)
    torch.testing.assert_close(got.cpu().double(), want, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    for what, g, r in zip(("features", "weight", "bias"), grads, want_grads):
        torch.testing.assert_close(
            g.cpu().double(), r, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE, msg=lambda m, w=what: f"d{w}: {m}"
        )


@needs_triton
def test_triton_sparse_conv_without_input_gradient():
    """Features that need no gradient (the first conv, reading images): the backward op skips the input
    gradient (a (0, C_in) placeholder, no GEMM) and the weight and bias gradients still equal the
    float64 dense conv's to FP32_TOLERANCE. Mutation seen failing: ``input_grad`` ignored by the
    backward op (the full transposed table passed: "dx (24, 3), wanted (0, 3)")."""
    visible = torch.tensor([[[[1, 1], [0, 1]]]], dtype=torch.bool)
    case = Case(1, (1, 2, 2), (2, 2, 2), (1, 1, 1), visible, 3, 5, seed=2, dtype=torch.float64)
    reference = lambda w, b: case.reference(case.features, w, b)  # noqa: E731
    _, want_grads = value_and_grads(reference, case, case.weight, case.bias)
    table = case.table().to(DEVICE)
    transposed = transposed_table(table, case.num_inputs)
    features = on_device(case.features.float())[0]
    weight, bias = (
        t.detach().clone().requires_grad_() for t in on_device(case.weight.float(), case.bias.float())
    )
    out = sparse_conv3d(features, table, transposed, weight, bias)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = torch.autograd.grad(out, (weight, bias), cotangent.to(out.device, out.dtype))
    for what, g, r in zip(("weight", "bias"), grads, want_grads):
        torch.testing.assert_close(
            g.cpu().double(), r, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE, msg=lambda m, w=what: f"d{w}: {m}"
        )
    dx, _, _ = torch.ops.maeformer.sparse_conv3d_backward(
        torch.ones_like(out), features, table, transposed, weight.detach(), False
    )
    assert dx.shape == (0, 3), f"dx {tuple(dx.shape)}, wanted (0, 3)"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_sparse_conv_half_precision_within_rounding(dtype, bf16_dots_in_interpreter):
    """fp16/bf16 features and weights (what autocast hands the op): outputs and gradients in that dtype,
    each within two rounding steps (eps x its largest value) of the fp32 computation on the same
    rounded inputs (measured: fp16 within 0.4 steps). Mutation caught: accumulating in the input dtype
    instead of fp32 (the forward's ``tl.dot`` with ``out_dtype`` the input dtype)."""
    visible = torch.tensor([[[[1, 0, 1], [1, 1, 0]], [[0, 1, 1], [1, 0, 1]]]], dtype=torch.bool)
    case = Case(1, (2, 2, 3), (2, 4, 4), (1, 2, 2), visible, 24, 40, seed=5, dtype=torch.float32)
    rounded = [t.to(dtype).float() for t in (case.features, case.weight, case.bias)]
    want, want_grads = value_and_grads(case.reference, case, *rounded)
    got, grads = value_and_grads(triton_conv(case), case, *on_device(*(t.to(dtype) for t in rounded)))
    assert [t.dtype for t in (got, *grads)] == [dtype] * 4
    for name, g, r in zip(("out", "dfeatures", "dweight", "dbias"), (got, *grads), (want, *want_grads)):
        step = torch.finfo(dtype).eps * r.abs().max().item()
        error = (g.cpu().float() - r).abs().max().item()
        assert error <= 2 * step, f"{name}: max error {error:.2e} is {error / step:.2f} rounding steps"


@needs_triton
def test_triton_sparse_conv_opcheck():
    """The custom ops' fakes, autograd registration and schemas agree with the kernels (what
    torch.compile relies on). Mutation caught: a fake whose output has the input's channel count;
    mutation seen failing: the backward fake's input gradient always shaped like the features."""
    visible = torch.tensor([[[[1, 0], [1, 1]]]], dtype=torch.bool)
    case = Case(1, (1, 2, 2), (2, 2, 2), (1, 1, 1), visible, 5, 7, seed=1, dtype=torch.float32)
    table = case.table().to(DEVICE)
    args = (*on_device(case.features), table, transposed_table(table, case.num_inputs))
    args = (*args, *on_device(case.weight, case.bias))
    args[0].requires_grad_()
    torch.library.opcheck(torch.ops.maeformer.sparse_conv3d.default, args)
    # The backward op, with and without the input gradient (a (0, C_in) placeholder then); it has no
    # autograd formula of its own (no double backward), so no aot_dispatch test.
    grad_out = torch.randn(args[1].shape[0], 7, device=DEVICE)
    for input_grad in (True, False):
        torch.library.opcheck(
            torch.ops.maeformer.sparse_conv3d_backward.default,
            (grad_out, args[0].detach(), args[1], args[2], args[3], input_grad),
            test_utils=("test_schema", "test_faketensor"),
        )
