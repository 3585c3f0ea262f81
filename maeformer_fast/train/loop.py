"""Pieces of the training loop shared by pretraining and fine-tuning."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..device import (
    CompiledModel,
    resolve_compile,
    resolve_compile_mode,
    resolve_precision,
    use_device,
    warn_eager_fallback,
)
from ..models.blocks import TransformerBlock
from ..types import Triple
from .checkpoint import CheckpointManager
from .distributed import DistInfo, broadcast_from_main, init_distributed, no_sync, wrap_ddp
from .optim import load_optimizer_state
from .preemption import DEFAULT_STOP_SIGNALS, parse_signals

RESUME_VALUES = (False, True, "auto")


@dataclass(frozen=True)
class RunSetup:
    """Where and how a run executes: device, resolved precision, ranks, output folder, data cache."""

    device: torch.device
    precision: str
    dist: DistInfo
    out: Path
    cache: Path


@dataclass
class RunConfig:
    """The fields every training run shares (pretraining and fine-tuning extend it).

    ``data`` is a raw dataset folder (Decathlon layout or plain NIfTI folder; preprocessed and cached
    on first use) or an existing preprocessing cache; ``out`` receives logs, checkpoints and weights.
    """

    data: str
    out: str
    model: str = "small"
    crop_size: Triple | None = None  # default: the model config's crop
    batch_size: int = 2
    seed: int = 0
    loader: str = "torch"
    num_workers: int = 2
    data_on_device: str = "auto"  # hold the cache in device memory: auto (if it fits), on, off
    precision: str = "auto"
    device: str = "auto"
    checkpoint_every: int = 100
    # True or "auto" (the same): continue from the newest intact checkpoint in out/checkpoints, or start
    # afresh where there is none; False: a new run, refused over an earlier run's checkpoints
    resume: bool | str = False
    stop_signals: str = DEFAULT_STOP_SIGNALS  # stop after a step with a checkpoint (preemption.py)
    cache_dir: str | None = None
    model_overrides: dict = field(default_factory=dict)
    progress: bool = True
    deterministic: bool = False  # deterministic kernels: bit-exact resume (slower scatter backward)
    accumulate_steps: int = 1  # micro-batches of batch_size per optimizer step (per rank)
    activation_checkpointing: bool = False  # recompute each transformer block's activations in backward
    compile: bool | None = None  # torch.compile the whole model; None: the device's default
    cuda_graph: bool = True  # with compile on one CUDA device: replay the compiled step as CUDA graphs
    tensorboard: bool = False  # also log to OUT/tensorboard (tensorboard.py); the CSV log stays

    # Counts and intervals a run divides by or loops over: each must be at least 1.
    POSITIVE = ("batch_size", "steps", "accumulate_steps", "checkpoint_every", "log_every", "preview_every",
                "val_every")  # fmt: skip

    def __post_init__(self) -> None:
        """Reject settings no run can use, before any work starts."""
        for name in self.POSITIVE:
            value = getattr(self, name, 1)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.resume not in RESUME_VALUES:
            raise ValueError(f"resume must be True, False or 'auto', got {self.resume!r}")
        parse_signals(self.stop_signals)  # an unknown name fails now, not when the signal comes

    @property
    def compile_mode(self) -> str | None:
        """torch.compile's mode for :func:`prepare_model`: "auto" (CUDA graphs where they apply) or,
        with ``cuda_graph`` off, the default mode."""
        return "auto" if self.cuda_graph else None


def setup_run(config: RunConfig) -> RunSetup:
    """Pick the device, join torchrun's process group, create ``config.out`` and build (rank 0) or
    wait for the preprocessing cache of ``config.data``."""
    from ..data import ensure_preprocessed, is_cache

    if config.deterministic:  # cuBLAS is reproducible only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch_device = use_device(config.device)
    torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
    dist_info = init_distributed(torch_device)
    out_path = Path(config.out)
    out_path.mkdir(parents=True, exist_ok=True)
    # Rank 0 builds (or refreshes) the cache; the others open exactly that folder instead of checking
    # the raw dataset again, which would rewrite the cache's plan files while rank 0 reads them.
    built = str(ensure_preprocessed(config.data, config.cache_dir)) if dist_info.is_main else None
    cache = Path(broadcast_from_main(built, dist_info))
    if not is_cache(cache):
        raise FileNotFoundError(
            f"rank {dist_info.rank} cannot open the preprocessing cache rank 0 built at {cache}: put "
            "--data (or --cache-dir) on a filesystem every node shares, or preprocess on every node "
            "with `maeformer preprocess SRC CACHE` and pass CACHE as --data (docs/scaling.md)"
        )
    return RunSetup(
        torch_device, resolve_precision(config.precision, torch_device), dist_info, out_path, cache
    )


@dataclass
class Optimisation:
    """Optimizer, LR schedule and gradient scaler of a run, stepped and checkpointed together.

    One optimizer step takes ``accumulate_steps`` micro-batches (:meth:`accumulate`, then :meth:`step`).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    grad_clip: float | None = None
    accumulate_steps: int = 1
    compiled_update: CompiledOptimizerStep | None = field(default=None, init=False)  # see compile_step

    def __post_init__(self) -> None:
        if self.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {self.accumulate_steps}")

    def accumulate(self, train_model: nn.Module, micro_loss: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Zero the gradients, then forward and backward every micro-batch.

        ``micro_loss(i)`` runs the forward of micro-batch i through ``train_model`` (the DDP wrapper
        when distributed) and returns its scalar loss. Each loss is divided by ``accumulate_steps``, so
        the gradient is that of the mean loss; DDP all-reduces only in the last micro-step's backward.
        Returns this rank's mean loss (detached), to be checked before :meth:`step`.
        """
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i in range(self.accumulate_steps):
            # DDP decides in forward whether the coming backward syncs, so the forward is inside too.
            with no_sync(train_model, skip=i < self.accumulate_steps - 1):
                loss = micro_loss(i)
                self.scaler.scale(loss / self.accumulate_steps).backward()
            # A copy: a CUDA-graph replay (compile mode "reduce-overhead") reuses its output memory.
            losses.append(loss.detach().float().clone())
        return torch.stack(losses).mean()

    def step(self) -> None:
        """Unscale (fp16: the clip threshold is in true gradient units), clip, optimizer and LR step;
        the scaler skips the optimizer step when fp16 gradients overflowed, and the LR schedule then
        waits for the next step that updates the weights. After :meth:`compile_step`, clipping and
        the optimizer step run as one compiled graph (no scaler there: every step updates)."""
        if self.compiled_update is not None and self.compiled_update():
            self.scheduler.step()  # fills the tensor learning rates the next step reads
            return
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        # Without fp16 the scale is a constant 1.0. With fp16 these reads wait for the device (the
        # scaler reads its overflow flags on the host inside step() as well): fp16's price for a
        # schedule that moves only with the weights.
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # a lower scale: fp16 overflow, optimizer step skipped
            self.scheduler.step()

    def compile_step(self, backend: str | Callable[..., Any] = "inductor", mode: str | None = None) -> None:
        """From now on run clipping and the optimizer step as one compiled graph
        (:class:`CompiledOptimizerStep`, torch.compile ``mode``, e.g. "reduce-overhead": replayed as a
        CUDA graph). fp16 keeps the eager step: its gradient scaler reads the device on the host.
        Needs tensor learning rates (``make_optimizer(..., tensor_lr=True)``), filled in place by the
        schedule: a float lr that changes every step would recompile the graph every step."""
        if self.scaler.is_enabled():
            return
        if not all(isinstance(g["lr"], torch.Tensor) for g in self.optimizer.param_groups):
            raise ValueError(
                "a compiled optimizer step needs tensor learning rates: make_optimizer(tensor_lr=True)"
            )
        parameters = list(self.model.parameters())  # the eager step's clipping order: the same norm
        self.compiled_update = CompiledOptimizerStep(
            self.optimizer, parameters, self.grad_clip, backend, mode
        )

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, manager: CheckpointManager, step: int, config: RunConfig, meta: dict[str, Any]) -> Path:
        """Checkpoint ``step`` with the run's settings (checked on resume) and ``meta``."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        return manager.save(step, self.model, state, {**meta, "config": _settings(config)})

    def resume(self, manager: CheckpointManager, config: RunConfig) -> tuple[int, dict[str, Any]]:
        """Load the newest intact checkpoint into model and optimisation state: (step, meta), or
        (0, {}) when there is none (a new run); a damaged newer one is reported and set aside
        (:meth:`CheckpointManager.newest`).

        Refuses a new run (``config.resume`` off) over an earlier run's checkpoints, and resuming a
        run whose checkpoint was trained with other settings than ``config`` (see CHANGEABLE_ON_RESUME).
        """
        if not config.resume and (found := manager.folders()):
            raise FileExistsError(
                f"{manager.root} holds the checkpoints of an earlier run (newest: {found[0].name}): pass "
                "--resume auto to continue it, or choose another --out"
            )
        latest = manager.newest()
        if latest is None:
            return 0, {}
        # A field added to the config later: an old checkpoint ran with the field's old behaviour.
        saved = {**ADDED_FIELDS, **manager.read_meta(latest).get("config", {})}
        current = _settings(config)
        changed = [  # settings both know: a field added later without an entry here does not block
            f"{name} {saved[name]!r} -> {current[name]!r}"
            for name in sorted(set(saved) & set(current))
            if name not in CHANGEABLE_ON_RESUME and saved[name] != current[name]
        ]
        if changed:
            raise ValueError(
                f"cannot resume {latest}: it was trained with other settings ({'; '.join(changed)}); "
                "resume with its settings, or start a new run in another --out"
            )
        state, meta = manager.load(latest, self.model)
        load_optimizer_state(self.optimizer, state["optimizer"])  # float-lr and tensor-lr runs alike
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved by a run without fp16: an fp16 resume starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        return meta["step"], meta


def compiles_optimizer_step(config: RunConfig, precision: str, device: torch.device) -> bool:
    """Whether the run of ``config`` compiles its optimizer step (:meth:`Optimisation.compile_step`),
    so that its optimizer needs tensor learning rates: with compile on, except in fp16."""
    return resolve_compile(config.compile, device) and precision != "fp16"


# Settings a resumed run may change: where things are and how they run, not what is trained.
# Fields added to a run config after checkpoints were written without them, with the value that gives
# the behaviour those checkpoints trained with (a resume under another value is refused like any change).
ADDED_FIELDS = {"lr_schedule": "decay", "recipe": "none", "until_plateau": False, "plateau_patience": 10,
                "plateau_min_delta": 0.005, "plateau_min_steps": 1000}  # fmt: skip

CHANGEABLE_ON_RESUME = frozenset({
    "data", "out", "cache_dir", "resume", "stop_signals", "progress", "num_workers", "loader", "device",
    "steps", "checkpoint_every", "log_every", "preview_every", "val_every", "max_val_cases", "evaluate_test",
    "compile", "cuda_graph", "activation_checkpointing", "deterministic", "precision", "data_on_device",
    "tensorboard",
    "until_plateau", "plateau_patience", "plateau_min_delta", "plateau_min_steps",  # when to stop, not how
    "init",  # the checkpoint's weights replace the initial ones anyway
})  # fmt: skip


def _settings(config: RunConfig) -> dict[str, Any]:
    """``config`` as the JSON a checkpoint stores (tuples become lists), to compare on resume."""
    return json.loads(json.dumps(asdict(config), default=str))


def prepare_model(
    model: nn.Module,
    dist_info: DistInfo,
    device: torch.device,
    compile_model: bool = False,
    activation_checkpointing: bool = False,
    compile_backend: str | Callable[..., Any] = "inductor",
    compile_mode: str | None = "auto",
    optimisation: Optimisation | None = None,
) -> nn.Module:
    """Set up ``model`` (already on the run's device) for training and return what to call in the loop.

    The transformer blocks are checkpointed in place (so ``model`` itself, which checkpoints and
    validation use, runs them too). ``compile_model`` compiles the whole forward -- the per-step plan,
    convs, gathers, norms, attention custom ops, the MAE decoder and loss -- as one graph
    (``fullgraph``, static shapes; AOTAutograd compiles the backward), falling back to eager with one
    warning if the compiler fails. ``compile_mode`` is torch.compile's mode; "auto" is "reduce-overhead"
    (the compiled forward and backward replay as CUDA graphs: 2.2-4.4x faster MAE steps on an H200,
    benchmarks/RESULTS.md) on a CUDA device in a single process, the default mode elsewhere. The
    result is wrapped in DDP when distributed. With ``compile_model``, ``optimisation``'s clipping and
    optimizer step are compiled too, with the same backend and mode (:meth:`Optimisation.compile_step`).
    """
    compile_mode = resolve_compile_mode(compile_mode, device, dist_info.enabled)
    if activation_checkpointing:
        for block in (m for m in model.modules() if isinstance(m, TransformerBlock)):
            block.residual = _checkpointed(
                block.residual
            )  # an instance attribute: the state dict is untouched
    train_model = CompiledModel(model, compile_backend, compile_mode) if compile_model else model
    if compile_model and optimisation is not None:
        optimisation.compile_step(compile_backend, compile_mode)
    return wrap_ddp(train_model, dist_info, device)


class CompiledOptimizerStep:
    """Gradient clipping (of ``parameters``, to ``grad_clip``) and ``optimizer``'s step as one compiled
    graph (``fullgraph``, static shapes), eager (with one warning) from the first compilation failure on.

    It calls the optimizer's undecorated ``step``: torch's decorated one breaks the graph on purpose
    around the update (to switch grad mode) and the LR scheduler's wrapper around it is not traced.
    The graph runs under ``no_grad`` instead, so AOTAutograd sees an inference graph of in-place
    updates. Skipped with the decoration: the optimizer's step hooks (none are used here) and its
    profiler label. A fresh optimizer's first step stays eager: it creates the state (AdamW's moments,
    SGD's momentum buffers), so the graph sees the state it keeps from its first call on (SGD's empty
    buffers would otherwise recompile it at the second step).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: list[nn.Parameter],
        grad_clip: float | None,
        backend: str | Callable[..., Any] = "inductor",
        mode: str | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.parameters = parameters
        self.grad_clip = grad_clip
        self.update = inspect.unwrap(type(optimizer).step)
        self.compiled = torch.compile(self._step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.failed = False
        self.stepped = False  # a graph ran: a later failure may come after it updated the weights

    def _step(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.update(self.optimizer)

    def __call__(self) -> bool:
        """Clip and step through the graph; False where the caller must step eagerly instead (a fresh
        optimizer, or compilation failed)."""
        if self.failed or not self.optimizer.state:
            return False
        if not self.stepped:
            # Every instance runs one code object (_step), and dynamo guards the parameters and the
            # optimizer state by address: each new run in a process would add a graph until dynamo's
            # recompile limit (8) stops compiling. A run's first step drops the other runs' graphs.
            torch._dynamo.reset_code(CompiledOptimizerStep._step.__code__)
        try:
            with torch.no_grad():
                self.compiled()
        except Exception as error:  # as CompiledModel: a compiler failure must not stop a run
            if self.stepped:  # an eager retry could apply the update twice: not a compiler failure
                raise
            self.failed = True
            warn_eager_fallback("the optimizer step", error)
            return False
        self.stepped = True
        self.optimizer._opt_called = True  # what the scheduler's wrapper of step() sets (else it warns)
        return True


def _checkpointed(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``function`` under activation checkpointing: its activations are recomputed in backward.

    Non-reentrant checkpointing restores the RNG state, so stochastic depth drops the same samples in
    the recomputation; the window grouping is an input (computed once per step by the plan), so the
    recomputation never redoes the sort.
    """

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():  # validation: nothing to save, nothing to recompute
            return function(*args, **kwargs)
        return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return run
