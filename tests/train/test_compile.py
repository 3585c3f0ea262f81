"""The model under torch.compile and activation checkpointing gives what the eager model gives."""

from __future__ import annotations

import copy
import shutil
import warnings
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from maeformer_fast.cli.args import dataclass_from_args
from maeformer_fast.cli.main import build_parser
from maeformer_fast.device import CompiledModel, resolve_compile_mode
from maeformer_fast.models.config import get_config
from maeformer_fast.models.mae import MaskedAutoencoder
from maeformer_fast.models.nnformer import NNFormer
from maeformer_fast.ops.masking import random_unit_mask
from maeformer_fast.train import finetune as ft
from maeformer_fast.train import pretrain as pt
from maeformer_fast.train.checkpoint import CheckpointManager
from maeformer_fast.train.distributed import DistInfo
from maeformer_fast.train.loop import Optimisation, RunConfig, prepare_model
from maeformer_fast.train.optim import make_optimizer, make_scheduler, param_groups, warmup_cosine

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


def test_an_eval_graph_that_fails_to_compile_leaves_training_compiled():
    """Validation (eval mode) gets its own graph; its failure must not turn the training step eager."""
    compiled, graphs_run = [], {"train": 0}

    def eval_breaks(graph, example_inputs):  # the first graph is the training one, the second eval's
        compiled.append(graph)
        if len(compiled) > 1:
            raise RuntimeError("no lowering for the eval graph")

        def counted(*args):
            graphs_run["train"] += 1
            return graph.forward(*args)

        return counted

    eager = segmenter(drop_path_rate=0.0)
    model = copy.deepcopy(eager)
    train_model = prepare_model(model, DistInfo(), CPU, compile_model=True, compile_backend=eval_breaks)
    assert_same(run(train_model, segmenter_loss, 0, model), run(eager, segmenter_loss, 0), exact=True)
    assert graphs_run["train"] == 1
    train_model.eval()
    with pytest.warns(RuntimeWarning, match="continuing eagerly in eval mode"), torch.no_grad():
        image = torch.ones(1, 1, *CROP)
        torch.testing.assert_close(train_model(image), eager.eval()(image))
    train_model.train()
    eager.train()
    assert_same(run(train_model, segmenter_loss, 1, model), run(eager, segmenter_loss, 1), exact=True)
    assert graphs_run["train"] == 2  # the training graph again, not the eager model
    assert train_model.eager_modes == {False}


# --- The whole training step: the model and the optimizer step (clipping + AdamW/SGD) compiled ---

STEPS = 5  # five batches and masks; the first optimizer step is eager (it creates the state)
# Measured: at most 1.2e-7 after five steps (one float32 rounding step at 1.0: a norm weight) in the
# three model cases, 3.0e-7 after a resume into the other lr kind (float32 tensor lrs round otherwise);
# a learning rate one step off or an unclipped step moves parameters by ~1e-4.
STEP_ATOL = 1e-6


def pretrain_case(
    encoder: str, optimizer: str, compile_model: bool, device: torch.device = CPU
) -> tuple[Any, torch.nn.Module, Any]:
    """(optimisation, model, loss of a seed) of the narrow small MAE on ``device``, built as
    ``pretrain`` builds it: warmup over 10 steps, so the LR changes at every step, and a clip threshold
    below the gradient norms (0.047-0.064 measured over these steps; fine-tuning 0.40-0.42), so
    clipping acts. Batches and masks are drawn on the CPU (the same on any device)."""
    config = pt.PretrainConfig(data="", out="", model="small", encoder=encoder, decoder_dim=16,
                               optimizer=optimizer, lr=1e-3, steps=20, warmup_steps=10, grad_clip=0.02,
                               model_overrides={**NARROW, "drop_path_rate": 0.0},
                               compile=compile_model)  # fmt: skip
    torch.manual_seed(0)
    model = pt.build_mae(config).to(device)

    def loss(train_model: torch.nn.Module, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(2, 1, *CROP, generator=generator).to(device)
        visible_ids = random_unit_mask(2, (2, 2, 2), 0.5, generator).to(device)
        return pt.mae_loss(train_model, images, visible_ids, "fp32", device)[0]

    return pt.build_optimisation(config, model, "fp32", device), model, loss


def finetune_case(_encoder: str, optimizer: str, compile_model: bool) -> tuple[Any, torch.nn.Module, Any]:
    """As :func:`pretrain_case` for fine-tuning (Dice + CE, deep supervision off in the small config),
    with layer-wise lr decay: twelve parameter groups with six learning rates."""
    config = ft.FinetuneConfig(data="", out="", model="small", optimizer=optimizer, steps=20,
                               warmup_steps=10, grad_clip=0.2, layer_decay=0.75,
                               compile=compile_model)  # fmt: skip
    torch.manual_seed(0)
    model = NNFormer(get_config("small", drop_path_rate=0.0, num_classes=3, **NARROW))

    def loss(train_model: torch.nn.Module, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(2, 1, *CROP, generator=generator)
        labels = torch.randint(0, 3, (2, *CROP), generator=generator)
        return ft.segmentation_loss(train_model, images, labels, "fp32", CPU)

    return ft.build_optimisation(config, model, "fp32", CPU), model, loss


def compile_run(
    optimisation: Optimisation, model: torch.nn.Module, device: torch.device, **options
) -> CompiledModel:
    """``model`` and ``optimisation``'s step compiled by ``prepare_model`` (``options``: backend, mode),
    from a fresh dynamo state with zeroed counters."""
    counters.clear()
    torch._dynamo.reset()
    return prepare_model(model, DistInfo(), device, compile_model=True, optimisation=optimisation, **options)


def step_both(
    compiled: tuple[Optimisation, torch.nn.Module],
    eager: tuple[Optimisation, torch.nn.Module],
    loss_of,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step of the compiled run and of the eager run, each (optimisation, model to
    call), on the batch and mask of ``seed``: (compiled loss, eager loss). The compiled one must
    neither fall back to eager nor make dynamo warn (it does when it traces through a cache wrapper)."""
    (optimisation, train_model), (eager_optimisation, eager_model) = compiled, eager
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = optimisation.accumulate(train_model, lambda _: loss_of(train_model, seed))
        optimisation.step()
    messages = [str(w.message) for w in record]
    assert not [m for m in messages if "torch.compile of" in m or "Dynamo detected" in m], messages
    expected = eager_optimisation.accumulate(eager_model, lambda _: loss_of(eager_model, seed))
    eager_optimisation.step()
    return loss, expected


def assert_parameters_close(
    model: torch.nn.Module, expected: torch.nn.Module, step: int, **tolerance
) -> None:
    for (name, p), q in zip(expected.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, **tolerance, msg=lambda m, n=name: f"step {step} {n}: {m}")


@pytest.mark.parametrize(
    ("case", "encoder", "optimizer"),
    [(pretrain_case, "sparse", "adamw"), (pretrain_case, "dense", "sgd"), (finetune_case, "", "adamw")],
)
def test_compiled_training_step_trains_like_eager(case, encoder, optimizer):
    """The whole step compiled as ``--compile`` runs it (model and optimizer step, ``aot_eager``):
    five batches with five masks and five optimizer steps (four through the compiled step) with a
    learning rate that changes at every step give the eager losses, learning rates and parameters
    (fp32), from one model graph and one optimizer-step graph: no break, no recompile.
    Sparse MAE with AdamW, dense MAE with Nesterov SGD, fine-tuning with AdamW and layer-wise lr decay."""
    eager, eager_model, loss_of = case(encoder, optimizer, compile_model=False)
    compiled, compiled_model, _ = case(encoder, optimizer, compile_model=True)
    assert isinstance(eager.optimizer.param_groups[0]["lr"], float)  # uncompiled runs: as before
    assert all(isinstance(g["lr"], torch.Tensor) for g in compiled.optimizer.param_groups)
    train_model = compile_run(compiled, compiled_model, CPU, compile_backend="aot_eager")
    lrs = []
    for seed in range(STEPS):
        loss, expected = step_both((compiled, train_model), (eager, eager_model), loss_of, seed)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        last_lrs = compiled.scheduler.get_last_lr()
        assert last_lrs == eager.scheduler.get_last_lr() and all(type(lr) is float for lr in last_lrs)
        torch.testing.assert_close([g["lr"].item() for g in compiled.optimizer.param_groups],
                                   [g["lr"] for g in eager.optimizer.param_groups])  # fmt: skip
        lrs.append(compiled.lr)
        assert_parameters_close(compiled_model, eager_model, seed, rtol=0, atol=STEP_ATOL)
    assert len(set(lrs)) == STEPS  # warmup: every step had its own learning rate
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # the model, the optimizer step
    assert not counters["graph_break"], dict(counters["graph_break"])


def small_optimisation(
    optimizer: str,
    tensor_lr: bool,
    backend: Any = "aot_eager",
    device: torch.device = CPU,
    mode: str | None = None,
) -> Optimisation:
    """A two-layer model on ``device`` with two parameter groups, warmup + cosine over 8 steps and
    clipping; with ``tensor_lr`` its clipping and optimizer step are compiled (``backend``, ``mode``),
    as ``--compile`` does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).to(
        device
    )
    built = make_optimizer(optimizer, param_groups(model, 0.05), 1e-2, tensor_lr=tensor_lr)
    schedule = make_scheduler(built, lambda step: warmup_cosine(step, 8, 4))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    optimisation = Optimisation(model, built, schedule, scaler, 0.5)
    if tensor_lr:
        optimisation.compile_step(backend, mode)
    return optimisation


def train(optimisation: Optimisation, steps: range) -> None:
    """Steps ``steps`` of a regression on batches seeded by the step (the same at any resume point,
    drawn on the CPU and moved to the model's device)."""
    model = optimisation.model
    device = next(model.parameters()).device
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x, y = (
            torch.randn(4, 6, generator=generator).to(device),
            torch.randn(4, 3, generator=generator).to(device),
        )
        optimisation.accumulate(model, lambda _, x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        optimisation.step()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("saved_tensor_lr", [False, True], ids=["float-to-tensor", "tensor-to-float"])
def test_checkpoint_resumes_between_float_and_tensor_learning_rates(tmp_path, optimizer, saved_tensor_lr):
    """A checkpoint of an uncompiled run (float lrs) resumes into a compiled one (tensor lrs, compiled
    step) and back, also with ``--compile`` and ``--cuda-graph`` changed: the resumed optimizer keeps
    its own kind of lr (its own tensors, filled) with the saved values, AdamW's step counts stay on
    the host as its options want, and three more steps give what the run gives uninterrupted."""
    straight = small_optimisation(optimizer, saved_tensor_lr)
    train(straight, range(6))
    first = small_optimisation(optimizer, saved_tensor_lr)
    train(first, range(3))
    checkpoints = CheckpointManager(tmp_path / "checkpoints")
    first.save(checkpoints, 3, RunConfig(data="", out=str(tmp_path), compile=saved_tensor_lr), {})

    resumed = small_optimisation(optimizer, not saved_tensor_lr)
    own_lrs = [g["lr"] for g in resumed.optimizer.param_groups]
    config = RunConfig(data="", out=str(tmp_path), compile=not saved_tensor_lr, cuda_graph=False, resume=True)
    assert resumed.resume(checkpoints, config)[0] == 3
    for group, own, saved in zip(resumed.optimizer.param_groups, own_lrs, first.optimizer.param_groups):
        assert group["lr"] is own if saved_tensor_lr is False else type(group["lr"]) is float
        assert float(group["lr"]) == pytest.approx(float(saved["lr"]), rel=1e-6)
        assert not group.get("capturable")
    steps = [s["step"] for s in resumed.optimizer.state.values() if "step" in s]
    assert all(step.device.type == "cpu" and step.item() == 3 for step in steps)
    assert len(steps) == (6 if optimizer == "adamw" else 0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(resumed, range(3, 6))
    messages = [str(w.message) for w in record]  # no eager fallback, no scheduler-order warning
    assert not [m for m in messages if "torch.compile of" in m or "lr_scheduler.step()" in m], messages
    assert resumed.lr == straight.lr and resumed.scheduler.last_epoch == straight.scheduler.last_epoch
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=STEP_ATOL)


def test_failing_step_compiler_falls_back_to_the_eager_step():
    """A compiler failing on the optimizer step: one warning, then the eager step for the rest of
    the run, which trains exactly as an uncompiled tensor-lr run."""

    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    fallback = small_optimisation("adamw", tensor_lr=True, backend=broken)
    eager = small_optimisation("adamw", tensor_lr=True)
    eager.compiled_update = None
    with pytest.warns(RuntimeWarning, match="torch.compile of the optimizer step failed") as record:
        train(fallback, range(4))
    assert len([w for w in record if "optimizer step failed" in str(w.message)]) == 1
    train(eager, range(4))
    for p, q in zip(eager.model.parameters(), fallback.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_compiled_optimizer_steps_keep_compiling_run_after_run():
    """Ten runs in one process (as the study makes), each with its own compiled optimizer step: none
    falls back. Mutation caught: without dropping the earlier runs' graphs, dynamo's recompile limit
    (8) stops the ninth run's compilation (a fullgraph hard failure, then the eager fallback)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        runs = [small_optimisation("adamw", tensor_lr=True) for _ in range(10)]
        for optimisation in runs:
            train(optimisation, range(2))
    assert [run.compiled_update.failed for run in runs] == [False] * 10, [str(w.message) for w in record]


def test_an_error_after_a_compiled_step_is_raised_not_retried_eagerly():
    """A failure of the compiled step once it has run (say, out of memory in a replay) is raised: the
    graph may have updated the weights already, and an eager retry would update them twice.
    Mutation caught: falling back to the eager step at any failure."""
    optimisation = small_optimisation("adamw", tensor_lr=True)
    train(optimisation, range(3))
    step = optimisation.compiled_update

    def replay_fails():
        raise RuntimeError("CUDA out of memory (simulated)")

    step.compiled = replay_fails
    with pytest.raises(RuntimeError, match="simulated"):
        train(optimisation, range(3, 4))


def test_a_checkpoint_with_other_parameter_groups_is_refused():
    """Mutation caught: groups paired by zip, which drops the extra ones and loads the rest silently."""
    from maeformer_fast.train.optim import load_optimizer_state

    saved = small_optimisation("adamw", tensor_lr=False).optimizer.state_dict()
    saved["param_groups"] = saved["param_groups"][:1]
    with pytest.raises(ValueError, match="1 parameter groups, this run's 2"):
        load_optimizer_state(small_optimisation("adamw", tensor_lr=True).optimizer, saved)


def test_each_group_keeps_its_own_lr_tensor(monkeypatch):
    """Tensor lrs: one per group (different lr scales, different values), filled in place by the
    schedule -- also where torch's scheduler would assign floats instead (torch versions before the
    in-place fill, simulated) -- and reported as floats."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    groups = param_groups(model, 0.0, lr_scale={"0.": 0.5})
    optimizer = make_optimizer("adamw", groups, 1e-2, tensor_lr=True)
    tensors = [g["lr"] for g in optimizer.param_groups]
    assert len({id(t) for t in tensors}) == len(tensors) == 2
    scheduler = make_scheduler(optimizer, lambda step: step + 1.0)

    def assign(group, key, value):  # what LambdaLR did before it filled tensors in place
        group[key] = value

    monkeypatch.setattr(torch.optim.lr_scheduler, "_update_param_group_val", assign)
    scheduler.step()
    assert all(g["lr"] is tensor for g, tensor in zip(optimizer.param_groups, tensors))
    assert [t.item() for t in tensors] == pytest.approx([1e-2, 2e-2])  # scale 0.5 at factor 2; 1 at 2
    assert scheduler.get_last_lr() == [1e-2, 2e-2]


def test_cuda_graph_setting_picks_the_compile_mode():
    """``--cuda-graph`` (default) captures on one CUDA device and nowhere else; ``--no-cuda-graph``
    compiles in torch.compile's default mode; the command line reaches the config. Resolving a mode
    needs no GPU: it reads only the device type and the world size."""
    cuda, one, two = torch.device("cuda"), DistInfo(), DistInfo(world_size=2)
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--no-cuda-graph"])
    off = dataclass_from_args(pt.PretrainConfig, args)
    on = pt.PretrainConfig(data="d", out="o")
    assert on.cuda_graph and not off.cuda_graph
    assert resolve_compile_mode(on.compile_mode, cuda, one.enabled) == "reduce-overhead"
    assert resolve_compile_mode(off.compile_mode, cuda, one.enabled) is None
    assert resolve_compile_mode(on.compile_mode, cuda, two.enabled) is None  # DDP: the default mode
    assert resolve_compile_mode(on.compile_mode, CPU, one.enabled) is None
