"""varlen_window_attention: torch and Triton backends against the per-group reference.

The Triton kernels run here under the interpreter (``TRITON_INTERPRET=1``: numpy, one program at a
time), so their cases are tiny but real: ragged groups, empty and single-token groups, a group longer
than a query block, shifted windows on odd grids with partial visibility, head dims 8/16/32, fp32 and
the half-precision inputs autocast gives them (fp16, bf16).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from maeformer_fast.ops import backend as ops_backend
from maeformer_fast.ops import bias_table_size, varlen_window_attention, window_groups
from maeformer_fast.ops import window_attention as wa
from maeformer_fast.types import as_triple

from ..triton_support import DEVICE, needs_triton, run_triton_tests_in_interpreter


def packed_groups(lengths, window, num_heads, head_dim, seed, dtype=torch.float32):
    """Random q, k, v (T, H, D), coords (T, 3), cu_seqlens and bias table for groups of ``lengths``.

    Each group holds distinct positions of one window placed at a random origin, as window_groups
    produces (empty groups allowed: cu_seqlens repeats an offset).
    """
    gen = torch.Generator().manual_seed(seed)
    wz, wy, wx = as_triple(window)
    cells = torch.stack(
        torch.meshgrid(torch.arange(wz), torch.arange(wy), torch.arange(wx), indexing="ij"), -1
    ).reshape(-1, 3)
    coords = [
        cells[torch.randperm(cells.shape[0], generator=gen)[:n]] + torch.randint(0, 50, (1, 3), generator=gen)
        for n in lengths
    ]
    coords = torch.cat(coords) if coords else torch.zeros(0, 3, dtype=torch.long)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    num_tokens = coords.shape[0]
    q, k, v = (torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype) for _ in range(3))
    table = torch.randn(bias_table_size(window), num_heads, generator=gen)
    return q, k, v, coords, cu, table


def shifted_case(grid, window, shift, keep, num_heads, head_dim, seed, batch_size=2):
    """Tokens of a partially visible odd grid grouped by (shifted) windows, sorted for the op."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.arange(n) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).repeat(batch_size, 1)
    batch = torch.arange(batch_size).repeat_interleave(coords.shape[0] // batch_size)
    visible = torch.rand(coords.shape[0], generator=gen) < keep
    coords, batch = coords[visible], batch[visible]
    order, cu = window_groups(coords, batch, window, shift)
    coords = coords[order]
    num_tokens = coords.shape[0]
    q, k, v = (torch.randn(num_tokens, num_heads, head_dim, generator=gen) for _ in range(3))
    table = torch.randn(bias_table_size(window), num_heads, generator=gen)
    return q, k, v, coords, cu, table


def forward_and_grads(backend, q, k, v, coords, cu, table, window, seed=1):
    """Output and gradients of (q, k, v, table) for a fixed random output cotangent."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
    out = varlen_window_attention(*leaves[:3], coords, cu, leaves[3], window, backend=backend)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(
        out.device, out.dtype
    )
    if out.grad_fn is None:  # no token in any group: nothing depends on the inputs
        return out, [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return out.detach(), grads


def assert_matches_reference(backend, case, window, atol=1e-4, rtol=1e-4):
    out, grads = forward_and_grads(backend, *case, window)
    ref_out, ref_grads = forward_and_grads("reference", *case, window)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------
# torch backend (the CPU path)

RAGGED = [5, 0, 1, 30, 7, 0, 64, 3, 1, 75]


@pytest.mark.parametrize("window", [(4, 4, 4), (3, 5, 5)])
def test_torch_matches_reference_ragged(window):
    lengths = [min(n, math.prod(window)) for n in RAGGED]
    assert_matches_reference("torch", packed_groups(lengths, window, 3, 16, seed=0), window, 1e-5, 1e-5)


@pytest.mark.parametrize(
    ("grid", "window", "shift"),
    [
        ((13, 11, 9), (4, 4, 4), (2, 2, 2)),
        ((13, 11, 9), (3, 5, 5), (1, 2, 2)),
        ((7, 5, 6), (8, 8, 8), (0, 0, 0)),
    ],
)
def test_torch_matches_reference_shifted_partial(grid, window, shift):
    case = shifted_case(grid, window, shift, keep=0.4, num_heads=2, head_dim=8, seed=3)
    assert_matches_reference("torch", case, window, 1e-5, 1e-5)


def test_torch_full_windows_shared_and_shuffled():
    # Dense grid: full windows in raster order take the shared-bias batch; shuffling the tokens of
    # some windows (still full) must send those through the per-pair path with the same result.
    case = list(shifted_case((8, 8, 12), (4, 4, 4), (0, 0, 0), keep=1.0, num_heads=2, head_dim=8, seed=5))
    assert_matches_reference("torch", case, (4, 4, 4), 1e-5, 1e-5)
    perm = torch.arange(case[0].shape[0])
    perm[64:128] = 64 + torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = [t[perm] for t in case[:4]] + case[4:]
    assert_matches_reference("torch", shuffled, (4, 4, 4), 1e-5, 1e-5)


def test_torch_bf16_close_to_reference():
    """Mutation caught: the logit scale 2% too large (error 4.9e-2 = 2.7 steps, which the former
    atol = rtol = 5e-2 let pass)."""
    case = packed_groups([10, 1, 64, 0, 33], (4, 4, 4), 2, 32, seed=4, dtype=torch.bfloat16)
    out = varlen_window_attention(*case, (4, 4, 4), backend="torch")
    ref = varlen_window_attention(
        *[t.float() if t.is_floating_point() else t for t in case], (4, 4, 4), backend="reference"
    )
    assert out.dtype == torch.bfloat16
    # Within one bf16 rounding step of the largest value (eps x max|ref|; measured 0.32 steps).
    step = torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() <= step


def test_no_tokens_and_only_empty_groups():
    for lengths in ([], [0, 0]):
        case = packed_groups(lengths, 4, 2, 8, seed=0)
        for backend in ("torch", "reference"):
            out, grads = forward_and_grads(backend, *case, 4)
            assert out.shape == (0, 2, 8)
            assert float(grads[3].abs().sum()) == 0.0


@pytest.mark.parametrize("head_dim", [8, 16, 32, 48])
@pytest.mark.parametrize("shared", [True, False])
def test_training_attention_on_cpu_is_sdpas_arithmetic_bit_for_bit(head_dim, shared):
    """``attend_with_bias`` in training on the CPU (the explicit form that skips SDPA's all-masked-row
    check) equals SDPA -- which takes its math path when the bias needs a gradient -- exactly: output
    and the q, k, v and bias gradients, for a bias shared by all windows and one per window, at the
    head dims of the configs. Mutation caught: ``(q * scale) @ k^T`` instead of scaling q and k by
    sqrt(scale) each (off by ~5e-7 at head dims 8, 32 and 48)."""
    torch.manual_seed(head_dim)
    n, heads, length = 6, 2, 64
    inputs = [torch.randn(n, heads, length, head_dim, requires_grad=True) for _ in range(3)]
    bias = torch.randn(*(() if shared else (n,)), heads, length, length, requires_grad=True)
    results = []
    for attend in (wa.attend_with_bias, sdpa_with_bias):
        for t in (*inputs, bias):
            t.grad = None
        out = attend(*inputs, bias, head_dim**-0.5)
        out.square().sum().backward()
        results.append([out.detach(), *(t.grad.clone() for t in (*inputs, bias))])
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def sdpa_with_bias(q, k, v, bias, scale):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.expand(q.shape[0], -1, -1, -1), scale=scale
    )


def test_auto_is_torch_on_cpu():
    case = packed_groups([9, 17], 4, 2, 8, seed=5)
    assert torch.equal(
        varlen_window_attention(*case, 4, backend="auto"), varlen_window_attention(*case, 4, backend="torch")
    )
    with pytest.raises(ValueError, match="backend"):
        varlen_window_attention(*case, 4, backend="cuda")


def test_available_is_honest(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ops_backend.triton_available() == (torch.cuda.is_available() and ops_backend._triton_importable())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops_backend.triton_available() == ops_backend._triton_importable()


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 27), min_size=1, max_size=6),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([8, 16, 24]),
    seed=st.integers(0, 2**16),
)
def test_torch_property(lengths, heads, head_dim, seed):
    assert_matches_reference("torch", packed_groups(lengths, 3, heads, head_dim, seed), 3, 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------------
# custom op and torch.compile


def test_custom_op_matches_eager_torch_backend():
    case = packed_groups([5, 0, 1, 40, 12], 4, 2, 16, seed=6)
    direct = forward_and_grads("torch", *case, 4)
    leaves = [t.detach().clone().requires_grad_() for t in (case[0], case[1], case[2], case[5])]
    out = wa.window_attention_op(*leaves[:3], case[3], case[4], leaves[3], 4, 0.25, "torch")
    grads = torch.autograd.grad(
        out, leaves, torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    )
    torch.testing.assert_close(out, direct[0], atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, direct[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def opcheck_forward_and_backward(backend, head_dim, device="cpu"):
    """torch.library.opcheck of both custom ops: schemas, and fakes with the real outputs' shapes,
    dtypes and strides (what inductor asserts in compiled code)."""
    q, k, v, coords, cu, table = (t.to(device) for t in packed_groups([5, 0, 1, 20], 4, 2, head_dim, seed=7))
    args = (q.requires_grad_(), k, v, coords, cu, table.requires_grad_(), [4, 4, 4], 0.3, backend)
    torch.library.opcheck(wa._attention_op, args)
    out, lse = wa._attention_op(*args)
    grad_args = (
        torch.randn_like(out),
        *(t.detach() for t in (q, k, v, out)),
        lse,
        coords,
        cu,
        table.detach(),
    )
    # The backward op has no autograd formula of its own (no double backward), so no aot_dispatch test.
    torch.library.opcheck(
        wa._attention_backward_op,
        (*grad_args, [4, 4, 4], 0.3, backend),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_custom_op_opcheck():
    opcheck_forward_and_backward("torch", head_dim=8)


def test_torch_compile_fullgraph():
    # aot_eager traces what inductor would (dynamo + fake tensors + the autograd formula) without
    # spending half a minute compiling C++ on a CPU runner.
    torch._dynamo.reset()
    case = packed_groups([5, 0, 1, 40, 12], 4, 2, 16, seed=8)

    def block(q, k, v, coords, cu, table):
        out = varlen_window_attention(q * 2.0, k, v, coords, cu, table, 4, backend="torch")
        return (out.relu() + 1.0).sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().clone().requires_grad_() for t in (case[0], case[1], case[2], case[5])]
    got = compiled(*leaves[:3], case[3], case[4], leaves[3])
    got_grads = torch.autograd.grad(got.sum(), leaves)
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    want = block(*leaves[:3], case[3], case[4], leaves[3])
    want_grads = torch.autograd.grad(want.sum(), leaves)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Triton backend under the interpreter


def test_triton_kernels_in_interpreter():
    run_triton_tests_in_interpreter(__file__)


def on_device(case):
    return tuple(t.to(DEVICE) for t in case)


@pytest.mark.parametrize(
    ("lengths", "window", "head_dim"),
    [
        ([5, 0, 1, 30, 7, 0, 3, 1], (4, 4, 4), 16),  # many small groups share one query block
        ([75, 1, 70], (3, 5, 5), 8),  # groups longer than a query block, anisotropic window
        ([1], (2, 2, 2), 32),  # a single token
    ],
)
@needs_triton
def test_triton_matches_reference(lengths, window, head_dim):
    assert_matches_reference("triton", on_device(packed_groups(lengths, window, 2, head_dim, seed=1)), window)


@pytest.mark.parametrize(
    ("grid", "window", "shift"), [((7, 6, 5), (4, 4, 4), (2, 2, 2)), ((5, 7, 6), (3, 5, 5), (0, 0, 0))]
)
@needs_triton
def test_triton_matches_reference_shifted_partial(grid, window, shift):
    case = on_device(
        shifted_case(grid, window, shift, keep=0.5, num_heads=2, head_dim=16, seed=2, batch_size=1)
    )
    assert_matches_reference("triton", case, window)


@pytest.mark.skipif(
    DEVICE != "cuda",
    reason="the interpreter runs one program at a time: run-to-run order "
    "cannot vary there, so this can only fail on a GPU (benchmarks/gpu_check.sh runs it)",
)
def test_gpu_triton_bias_grad_is_deterministic():
    """Bit-identical outputs and gradients run to run on a GPU, where programs race. Mutation caught (on
    a GPU only): the partial bias tables summed with atomics in scheduling order."""
    case = on_device(packed_groups([20, 3, 64, 0, 9], (4, 4, 4), 2, 16, seed=3))
    first = forward_and_grads("triton", *case, (4, 4, 4))
    second = forward_and_grads("triton", *case, (4, 4, 4))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@needs_triton
def test_triton_custom_op_path():
    case = on_device(packed_groups([6, 0, 13], 3, 2, 16, seed=4))
    want = forward_and_grads("reference", *case, 3)
    leaves = [t.detach().clone().requires_grad_() for t in (case[0], case[1], case[2], case[5])]
    out = wa.window_attention_op(*leaves[:3], case[3], case[4], leaves[3], 3, 0.25, "triton")
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad(out, leaves, cotangent)
    torch.testing.assert_close(out, want[0], atol=1e-4, rtol=1e-4)
    for got, ref in zip(grads, want[1]):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_custom_op_opcheck():
    # The fakes must match the kernels' outputs exactly: a transposed bias gradient once passed every
    # eager test and failed only inside inductor-compiled code.
    opcheck_forward_and_backward("triton", head_dim=16, device=DEVICE)


@needs_triton
def test_triton_empty_inputs():
    for lengths in ([], [0, 0]):
        out, grads = forward_and_grads("triton", *on_device(packed_groups(lengths, 4, 2, 8, seed=0)), 4)
        assert out.shape == (0, 2, 8)
        assert float(grads[3].abs().sum()) == 0.0


@settings(max_examples=6, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 18), min_size=1, max_size=5),
    window=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)),
    head_dim=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
@needs_triton
def test_triton_property(lengths, window, head_dim, seed):
    lengths = [min(n, math.prod(window)) for n in lengths]
    assert_matches_reference("triton", on_device(packed_groups(lengths, window, 2, head_dim, seed)), window)


@settings(max_examples=12, deadline=None)
@given(
    grid=st.tuples(st.integers(2, 7), st.integers(2, 7), st.integers(2, 7)),
    window=st.sampled_from([(2, 2, 2), (3, 3, 3), (3, 5, 5), (4, 2, 3)]),
    shifted=st.booleans(),
    keep=st.sampled_from([0.25, 0.6, 1.0]),
    head_dim=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
@needs_triton
def test_triton_property_shifted_windows_on_odd_grids(grid, window, shifted, keep, head_dim, seed):
    # Grids not divisible by the window, plain or shifted by half a window, with visible-only tokens.
    shift = tuple(w // 2 for w in window) if shifted else (0, 0, 0)
    case = shifted_case(grid, window, shift, keep, num_heads=2, head_dim=head_dim, seed=seed, batch_size=1)
    assert_matches_reference("triton", on_device(case), window)


@needs_triton
def test_triton_non_contiguous_inputs():
    # q, k, v as a model makes them (unbind of a fused projection) and as a dense transposed view.
    q, k, v, coords, cu, table = on_device(packed_groups([7, 0, 20], 3, 2, 16, seed=6))
    fused = torch.stack([q, k, v], 1)  # [T, 3, H, D]
    views = (fused[:, 0], fused[:, 1], q.transpose(0, 1).contiguous().transpose(0, 1))
    assert not any(t.is_contiguous() for t in views)
    assert_matches_reference("triton", (*views, coords, cu, table), 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@needs_triton
def test_triton_half_precision_within_rounding(dtype, bf16_dots_in_interpreter):
    # Half-precision q, k, v (what autocast hands the kernels) with the fp32 bias table: outputs and
    # q/k/v gradients come back in the input dtype, the table gradient in fp32, and each is within two
    # rounding steps of the dtype (eps x its largest value) of the fp32 reference on the same rounded
    # inputs. For scale: the torch path in the same dtype lands within 0.6 of a step here, the
    # kernels (which round the probabilities and dS to the input dtype before their dots) within 1.2.
    window = (3, 5, 5)
    case = packed_groups([20, 3, 75, 0, 9, 40], window, 2, 32, seed=3, dtype=dtype)
    want = forward_and_grads("reference", *[t.float() if t.is_floating_point() else t for t in case], window)
    out, grads = forward_and_grads("triton", *on_device(case), window)
    assert [t.dtype for t in (out, *grads)] == [dtype, dtype, dtype, dtype, torch.float32]
    for name, got, ref in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads), (want[0], *want[1])):
        step = torch.finfo(dtype).eps * ref.abs().max().item()
        error = (got.cpu().float() - ref).abs().max().item()
        assert error <= 2 * step, f"{name}: max error {error:.2e} is {error / step:.2f} rounding steps"


class HostReads(TorchDispatchMode):
    """Records the ops that make a CUDA host wait for the device: scalar reads (``.item()``, ``bool()``,
    ``int()``), ops whose output shape depends on tensor values, and tensors made from host data
    (``torch.tensor``, ``new_tensor``: a blocking copy from pageable memory, which waits for the
    queued kernels)."""

    DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "unique_consecutive", "_unique2", "masked_select"}
    FROM_HOST = {"lift_fresh"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if name in self.DATA_DEPENDENT or name in self.FROM_HOST or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@needs_triton
def test_triton_sparse_mae_step_never_waits_for_the_device():
    # The GPU path: Triton attention and padded window groups (what the plan makes for the Triton
    # backend). A forward + backward of the visible-only MAE then has no op that syncs the host.
    from maeformer_fast.models import get_config
    from maeformer_fast.models.mae import MaskedAutoencoder
    from maeformer_fast.ops.masking import random_unit_mask

    config = get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2), attention_backend="triton")
    model = MaskedAutoencoder(config, decoder_dim=16, decoder_depth=1).to(DEVICE)
    crop = (32, 32, 32)
    images = torch.randn(2, 1, *crop, device=DEVICE)
    ids = random_unit_mask(2, model.encoder.unit_grid(crop), 0.75, device=DEVICE)
    reads = HostReads()
    with reads:
        loss, _ = model(images, ids)
        loss.backward()
    assert reads.found == [], reads.found
