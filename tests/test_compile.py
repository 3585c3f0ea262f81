"""The model under torch.compile and activation checkpointing gives what the eager model gives."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from maeformer_fast.models.config import get_config
from maeformer_fast.models.mae import MaskedAutoencoder
from maeformer_fast.models.nnformer import NNFormer
from maeformer_fast.ops.masking import random_unit_mask
from maeformer_fast.train.distributed import DistInfo
from maeformer_fast.train.loop import prepare_model

CPU = torch.device("cpu")
CROP = (32, 32, 32)
# The small config's structure (4 stages, shifted windows, skip attention) at a narrow width.
NARROW = {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two spin-waiting threads on a loaded 2-core machine are far slower
    yield
    torch.set_num_threads(threads)


def segmenter(drop_path_rate: float) -> NNFormer:
    torch.manual_seed(0)
    return NNFormer(get_config("small", drop_path_rate=drop_path_rate, **NARROW))


def mae(drop_path_rate: float, encoder_mode: str = "sparse") -> MaskedAutoencoder:
    torch.manual_seed(0)
    config = get_config("small", drop_path_rate=drop_path_rate, **NARROW)
    return MaskedAutoencoder(config, encoder_mode=encoder_mode, decoder_dim=16)


def dense_mae(drop_path_rate: float) -> MaskedAutoencoder:
    return mae(drop_path_rate, encoder_mode="dense")


def segmenter_loss(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, *CROP, generator=generator)
    torch.manual_seed(seed)  # stochastic depth
    outputs = model(x)
    return sum(o.square().mean() for o in outputs), outputs


def mae_loss(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, *CROP, generator=generator)
    visible_ids = random_unit_mask(2, (2, 2, 2), 0.5, generator)  # a new mask, so new token counts
    torch.manual_seed(seed)
    loss, prediction = model(x, visible_ids)
    return loss, [prediction]


def run(
    model: torch.nn.Module, loss_fn, seed: int, module: torch.nn.Module | None = None
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of one forward/backward through ``model`` and the gradients of ``module``'s parameters
    (``model`` itself unless it is a wrapper around ``module``)."""
    module = model if module is None else module
    module.zero_grad(set_to_none=True)
    loss, outputs = loss_fn(model, seed)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [o.detach() for o in outputs], grads


def assert_same(actual, expected, exact: bool) -> None:
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 5e-6}
    torch.testing.assert_close(actual[0], expected[0], **tolerance)
    assert actual[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


# inductor (what `--compile` uses) generates and builds C++ on the CPU: it needs a compiler.
NEEDS_CXX = pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler")


@pytest.mark.parametrize(
    ("build", "loss_fn", "checkpointing", "backend"),
    [
        (segmenter, segmenter_loss, False, "aot_eager"),
        (mae, mae_loss, True, "aot_eager"),
        (dense_mae, mae_loss, False, "aot_eager"),
        # inductor (what `--compile` uses) takes minutes to build on 2 cores: the sparse MAE only.
        pytest.param(mae, mae_loss, True, "inductor", marks=NEEDS_CXX),
    ],
)
def test_compiled_model_trains_like_eager_in_one_graph(build, loss_fn, checkpointing, backend):
    """The whole model compiled (fine-tuning, sparse MAE with activation checkpointing, dense MAE):
    five steps with five different batches and masks, each with an AdamW update, give the eager
    losses, gradients and parameters (fp32, to 1e-5), from one graph with no break and no recompile.
    Mutations caught: a host read in the plan (``int(visible_ids.max())``: a graph break, so fullgraph
    fails and the run falls back with a warning), and the key gradient of the attention custom op's
    backward (the path only compiled graphs take) without its ``scale`` (gradients differ)."""
    eager = build(drop_path_rate=0.0)  # compiled RNG streams differ from eager ones
    compiled = copy.deepcopy(eager)
    counters.clear()
    torch._dynamo.reset()  # each backend compiles from scratch
    train_model = prepare_model(compiled, DistInfo(), CPU, compile_model=True, compile_backend=backend,
                                activation_checkpointing=checkpointing)  # fmt: skip
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (eager, compiled)]
    for seed in range(5):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            result = run(train_model, loss_fn, seed, compiled)
        # Our eager fallback, or dynamo tracing through something it warns about (a cache wrapper).
        messages = [str(w.message) for w in record]
        assert not [m for m in messages if "of the model failed" in m or "Dynamo detected" in m], messages
        assert_same(result, run(eager, loss_fn, seed), exact=False)
        for optimizer in optimizers:
            optimizer.step()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(
                q, p, rtol=1e-5, atol=1e-5, msg=lambda m, n=name, s=seed: f"step {s} {n}: {m}"
            )
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize(("build", "loss_fn"), [(segmenter, segmenter_loss), (mae, mae_loss)])
def test_activation_checkpointing_gives_identical_gradients(build, loss_fn):
    plain = build(drop_path_rate=0.3)  # recomputation must drop the same samples
    checkpointed = copy.deepcopy(plain)
    prepare_model(checkpointed, DistInfo(), CPU, activation_checkpointing=True)
    assert_same(run(checkpointed, loss_fn, 0), run(plain, loss_fn, 0), exact=True)


def test_failing_compiler_falls_back_to_eager_with_a_warning():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    eager = segmenter(drop_path_rate=0.0)
    fallback = copy.deepcopy(eager)
    train_model = prepare_model(fallback, DistInfo(), CPU, compile_model=True, compile_backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile of the model failed"):
        result = run(train_model, segmenter_loss, 0, fallback)
    assert_same(result, run(eager, segmenter_loss, 0), exact=True)


def test_compiler_failing_on_the_backward_falls_back_too():
    # AOTAutograd would lower the backward only at the first backward(), outside the fallback's try.
    from torch._dynamo.backends.common import aot_autograd

    def broken(graph, example_inputs):
        raise RuntimeError("this op has no backward lowering")

    eager = segmenter(drop_path_rate=0.0)
    fallback = copy.deepcopy(eager)
    backend = aot_autograd(fw_compiler=lambda graph, example_inputs: graph, bw_compiler=broken)
    train_model = prepare_model(fallback, DistInfo(), CPU, compile_model=True, compile_backend=backend)
    with pytest.warns(RuntimeWarning, match="this op has no backward lowering"):
        result = run(train_model, segmenter_loss, 0, fallback)
    assert_same(result, run(eager, segmenter_loss, 0), exact=True)
