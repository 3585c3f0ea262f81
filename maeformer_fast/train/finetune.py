"""Fine-tuning nnFormer for segmentation from a pretrained encoder or from scratch: ``finetune()``."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.cache import load_plan
from ..data.io import atomic_write_text
from ..device import autocast, resolve_compile
from ..inference.evaluation import score_cases, summarise
from ..models.config import NNFormerConfig, get_config
from ..models.nnformer import NNFormer
from ..models.pretrained import init_from_encoder, read_encoder_file, save_segmenter
from ..seeds import derive_seed
from .checkpoint import CheckpointManager
from .distributed import barrier, broadcast_from_main, mean_across_ranks
from .loop import Optimisation, RunConfig, compiles_optimizer_step, prepare_model, setup_run
from .losses import deep_supervision_loss
from .optim import make_optimizer, make_scheduler, param_groups, poly, warmup_constant, warmup_cosine
from .plateau import PlateauRule
from .preemption import Interruption, StopSignals
from .recipes import FIXED_STEPS, RECIPES, describe, global_batch, recipe_name, recipe_values
from .runtime import CsvLog, PendingLosses
from .splits import make_splits
from .tensorboard import TensorBoardLog

OPTIMIZER_DEFAULTS = {"adamw": {"lr": 1e-3, "weight_decay": 0.01}, "sgd": {"lr": 1e-2, "weight_decay": 3e-5}}


LR_SCHEDULES = ("decay", "constant")


@dataclass
class FinetuneConfig(RunConfig):
    """A fine-tuning run: :class:`RunConfig`'s shared fields and its own. Optimisation settings left
    unset come from a recipe (``recipes.py``: the converged study's, MAE or scratch).

    Labeled cases are split once (``split_seed``) into test, validation and a training pool; the
    ``labeled`` / ``labeled_fraction`` training cases are drawn from the pool by ``seed``. The batch
    Dice of the loss is taken over each micro-batch of each rank, so a global batch split over ranks
    or ``accumulate_steps`` is not one Dice over all of its samples.
    """

    init: str | None = None  # encoder.safetensors from pretraining; None = from scratch
    # None: with ``init`` the encoder file's model settings, else the small config
    model: str | None = None  # type: ignore[assignment]
    labeled: int | None = None
    labeled_fraction: float | None = None
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    # The optimisation settings below left at None come from the recipe (recipes.py): "auto" = "mae"
    # with ``init``, "scratch" without; "none" = the optimizer's defaults.
    recipe: str = "auto"
    steps: int | None = None  # None: the recipe's maximum with ``until_plateau``, else 300
    until_plateau: bool = False  # stop when validation Dice plateaus (plateau.py); ``steps`` is a maximum
    plateau_patience: int = 10  # validations without a gain above ``plateau_min_delta``
    plateau_min_delta: float = 0.005
    plateau_min_steps: int = 1000
    optimizer: str = "adamw"  # "adamw" or "sgd" (nesterov 0.99, poly 0.9, nnU-Net)
    # "decay": the optimizer's decay over ``steps`` (adamw: cosine, sgd: poly); "constant": warmup then
    # the peak lr, for runs a plateau rule stops (``steps`` is then only a maximum)
    lr_schedule: str | None = None
    lr: float | None = None  # no recipe: adamw 1e-3, sgd 1e-2
    weight_decay: float | None = None  # no recipe: adamw 0.01, sgd 3e-5
    warmup_steps: int | None = None  # adamw, and any "constant" schedule; no recipe: 5% of steps
    layer_decay: float | None = None  # lr factor per encoder stage below the decoder (1 = none)
    freeze_encoder_steps: int | None = None  # the encoder's weights stay fixed for the first N steps
    grad_clip: float = 12.0
    foreground_oversample: float = 0.33
    val_every: int = 100
    max_val_cases: int | None = None
    evaluate_test: bool = True

    def __post_init__(self) -> None:
        """Fill what the run left unset from its recipe (idempotent: ``recipe`` becomes the recipe's
        name and the filled fields are set, so a copy resolves to itself); ``recipe_note`` says what."""
        name = recipe_name(self.recipe, self.init, self.optimizer)
        if self.steps is None:
            self.steps = RECIPES[name].max_steps if self.until_plateau else FIXED_STEPS
        given = recipe_values(name, self.steps, self.until_plateau,
                              global_batch(self.batch_size, self.accumulate_steps))  # fmt: skip
        for key, value in given.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.recipe = name
        self.recipe_note = describe(name, {key: getattr(self, key) for key in given}, given, self.steps)
        super().__post_init__()
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")


@dataclass
class FinetuneResult:
    out: Path
    model_path: Path  # best validation checkpoint
    last_path: Path
    best_val_dice: float
    best_step: int
    curve: list[tuple[int, float]]  # (step, validation mean Dice)
    splits: dict
    test_dice: dict[str, float] | None
    test_hd95: dict[str, float] | None
    wall_time_s: float
    paused: bool = False  # ended at a checkpoint by ``pause`` or a signal: not scored, resume to finish
    interrupted: Interruption | None = None  # the signal that ended it (preemption.py)


def segmenter_config(config: FinetuneConfig, overrides: dict) -> tuple[NNFormerConfig, str]:
    """The model a run trains, and where its settings came from: ``config.model`` when set; else the
    encoder file's settings with ``init`` (so a pretrained encoder needs no model options), else the
    small config; ``overrides`` (channels and classes of the data, then the run's own) on top."""
    if config.model is not None or not config.init:
        name = config.model or "small"
        return get_config(name, **overrides), f"model config {name!r}" + (
            f" with {config.model_overrides}" if config.model_overrides else ""
        )
    _, encoder_config, _ = read_encoder_file(config.init)
    settings = {**encoder_config.to_dict(), **overrides}
    return NNFormerConfig.from_dict(settings), (
        f"model settings from the encoder file {config.init} (config {encoder_config.name!r}, "
        f"{encoder_config.num_stages} stages, embedding {encoder_config.embed_dim})"
    )


def layer_lr_scales(model: NNFormer, decay: float) -> dict[str, float]:
    """Layer-wise lr decay: the last encoder stage gets ``decay``, each stage below one factor more,
    the embedding the smallest; decoder and heads keep the full lr."""
    stages = model.config.num_stages
    scales = {f"encoder.stages.{i}.": decay ** (stages - i) for i in range(stages)}
    scales["encoder.patch_embed."] = decay ** (stages + 1)
    return scales


def build_optimizer(
    config: FinetuneConfig, model: NNFormer, tensor_lr: bool = False
) -> tuple[torch.optim.Optimizer, float]:
    # An unknown optimizer name gets no defaults here and is refused by make_optimizer.
    defaults = OPTIMIZER_DEFAULTS.get(config.optimizer, {"lr": None, "weight_decay": None})
    lr = config.lr if config.lr is not None else defaults["lr"]
    wd = config.weight_decay if config.weight_decay is not None else defaults["weight_decay"]
    scales = layer_lr_scales(model, config.layer_decay) if config.layer_decay != 1.0 else None
    return make_optimizer(config.optimizer, param_groups(model, wd, scales), lr, tensor_lr=tensor_lr), lr


def build_optimisation(
    config: FinetuneConfig, model: NNFormer, precision: str, device: torch.device
) -> Optimisation:
    """The optimizer of ``config.optimizer`` with its schedule (``lr_schedule`` "decay": sgd poly, adamw
    warmup + cosine; "constant": warmup then constant), a gradient scaler for fp16, clipping and
    accumulation; tensor learning rates where the run compiles its optimizer step."""
    optimizer, _ = build_optimizer(config, model, compiles_optimizer_step(config, precision, device))
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 20)
    if config.lr_schedule == "constant":
        schedule = functools.partial(warmup_constant, warmup=warmup)
    elif config.optimizer == "sgd":
        schedule = functools.partial(poly, total=config.steps)
    else:
        schedule = functools.partial(warmup_cosine, total=config.steps, warmup=warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return Optimisation(
        model,
        optimizer,
        make_scheduler(optimizer, schedule),
        scaler,
        config.grad_clip,
        config.accumulate_steps,
    )


def segmentation_loss(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str, device: torch.device
) -> torch.Tensor:
    """Deep-supervision Dice + CE of images (B, C, Z, Y, X) against labels (B, Z, Y, X); the forward
    under the run's autocast, the loss in fp32."""
    with autocast(precision, device):
        outputs = model(images)
    return deep_supervision_loss(outputs, labels)


def finetune(
    config: FinetuneConfig,
    stop: Callable[[list[tuple[int, float]]], bool] | None = None,
    pause: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune; validation Dice every ``val_every`` steps picks the best model; resumable.

    ``stop(curve)``, called after each validation with the (step, Dice) curve so far, ends training
    early when it returns True (single process only: e.g. a plateau criterion). ``pause()``, asked after
    each checkpoint of a run that goes on, ends it there when it returns True (single process only; e.g.
    a time budget): the result says ``paused``, the test split is not scored, and a resumed run
    continues from that checkpoint as if it had not stopped. A signal of ``config.stop_signals`` or
    SIGINT ends it the same way after the step it arrived in (and that step's validation), with a
    checkpoint there, on every rank (the result's ``interrupted`` says which signal, and where)."""
    from ..data import make_loader

    run = setup_run(config)
    if config.until_plateau:
        if stop is not None:
            raise ValueError("finetune: until_plateau and a stop rule of the caller: choose one")
        stop = PlateauRule(config.plateau_patience, config.plateau_min_delta, config.plateau_min_steps)
    if (stop is not None or pause is not None) and run.dist.enabled:
        raise ValueError(
            "finetune: stop and pause need a single process (their decisions are not shared across ranks)"
        )
    device, dist_info, out = run.device, run.dist, run.out
    plan = load_plan(run.cache)
    labeled_cases = [c["id"] for c in plan["cases"] if c["has_label"]]
    splits = make_splits(labeled_cases, config.val_fraction, config.test_fraction, config.split_seed,
                         config.labeled, config.labeled_fraction, config.seed)  # fmt: skip
    val_cases = splits.val[: config.max_val_cases] if config.max_val_cases else splits.val

    overrides = {
        "in_channels": plan["num_channels"],
        "num_classes": plan["num_classes"],
        **config.model_overrides,
    }
    model_config, model_note = segmenter_config(config, overrides)
    if dist_info.is_main:
        print(f"finetune: {config.recipe_note}\nfinetune: {model_note}", flush=True)
    torch.manual_seed(config.seed)
    model = NNFormer(model_config)
    init_info = init_from_encoder(model, config.init) if config.init else None
    model.to(device)
    crop = tuple(config.crop_size or model.config.crop_size)
    optimisation = build_optimisation(config, model, run.precision, device)
    checkpoints = CheckpointManager(out / "checkpoints", dist=dist_info)
    start_step, meta = optimisation.resume(checkpoints, config)
    best = meta.get("best", {"dice": -1.0, "step": 0})
    curve = [tuple(point) for point in meta.get("curve", [])]
    earlier_s = meta.get("elapsed_s", 0.0)  # training time before a resume, so logs count the whole run

    train_model = prepare_model(model, dist_info, device, resolve_compile(config.compile, device),
                                config.activation_checkpointing, compile_mode=config.compile_mode,
                                optimisation=optimisation)  # fmt: skip
    micro_steps = config.accumulate_steps
    model_path, last_path = out / "model.safetensors", out / "last.safetensors"
    info = {"config": asdict(config), "splits": splits.to_dict(), "init": init_info}
    if dist_info.is_main:
        atomic_write_text(out / "splits.json", json.dumps(splits.to_dict(), indent=2))
        atomic_write_text(out / "finetune_config.json", json.dumps(asdict(config), indent=2, default=str))
        log = CsvLog(out / "finetune_log.csv", ["step", "loss", "lr", "val_dice", "elapsed_s"],
                     resume_step=start_step or None)  # fmt: skip
    board = TensorBoardLog(out / "tensorboard", config.tensorboard and dist_info.is_main, start_step or None)
    loader = make_loader(
        run.cache, crop, config.batch_size, labeled=True, cases=splits.train, backend=config.loader,
        device=device, seed=config.seed, start_step=start_step * micro_steps, rank=dist_info.rank,
        world_size=dist_info.world_size, foreground_oversample=config.foreground_oversample,
        num_workers=config.num_workers, data_on_device=config.data_on_device,
    )  # fmt: skip

    # Validation runs the compiled model when the run compiles: one eval graph per window shape. An
    # eval graph that fails to compile makes validation eager, not training (CompiledModel).
    validation_model = train_model.module if dist_info.enabled else train_model

    def validate(step: int) -> float:
        scores = score_cases(validation_model, run.cache, val_cases, crop, model.config.num_classes,
                             plan["spacing"], device, run.precision)  # fmt: skip
        return summarise(scores)["mean"]

    case_ids: list[str] = []  # the cases of the current step's micro-batches, for error messages

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        # The micro-batch counter is the loader position and seeds stochastic depth (per rank).
        index = step * micro_steps + micro
        batch = next(loader)
        torch.manual_seed(derive_seed(config.seed, dist_info.rank, index, "train"))
        case_ids[:] = (case_ids if micro else []) + batch.get("case_ids", [])
        return segmentation_loss(train_model, batch["image"], batch["label"], run.precision, device)

    started = time.perf_counter() - earlier_s  # the whole run's clock, resumed parts included
    model.train()
    # A run stopped by ``stop`` at a checkpoint step and interrupted before it ended (e.g. while
    # scoring the test split) resumes there: it must not train past its stop.
    stopped = bool(stop and curve and curve[-1][0] == start_step and stop(curve))
    end_step = start_step if stopped else config.steps
    bar = tqdm(range(start_step, end_step), initial=start_step, total=config.steps, desc="finetune",
               disable=not (config.progress and dist_info.is_main), dynamic_ncols=True)  # fmt: skip
    done = start_step
    # Losses stay on the device until a validation or checkpoint step reads them all at once (one
    # host wait per read, not per step); ``rows`` keeps the other log fields of those steps.
    pending = PendingLosses(dist_info.rank if dist_info.enabled else None)
    rows: list[dict[str, str]] = []
    paused = False
    block_start_s = earlier_s
    with StopSignals(config.stop_signals, dist_info) as signals, board:
        for step in bar:
            if config.freeze_encoder_steps:  # no gradient: AdamW/SGD leave weights and moments untouched
                model.encoder.requires_grad_(step >= config.freeze_encoder_steps)
            local_loss = optimisation.accumulate(train_model, functools.partial(micro_loss, step))
            pending.add(step, mean_across_ranks(local_loss, dist_info), local_loss, case_ids)
            rows.append({"step": step + 1, "lr": f"{optimisation.lr:.3e}"})  # before the schedule steps
            optimisation.step()
            rows[-1]["elapsed_s"] = f"{time.perf_counter() - started:.2f}"
            done = step + 1
            stopping = signals.requested()  # the same answer on every rank: all stop after this step
            validate_now = done % config.val_every == 0 or done == config.steps
            save_now = done % config.checkpoint_every == 0 or done == config.steps or stopping
            if not (validate_now or save_now):
                continue
            losses = pending.read()  # every rank reads at the same steps: a NaN stops them together
            logged, rows = rows, []
            bar.set_postfix(loss=f"{losses[-1]:.4f}", best_dice=f"{max(best['dice'], 0):.3f}")
            if not dist_info.is_main:
                if stopping:
                    break
                continue
            val_dice = None
            if validate_now:
                val_dice = validate(done)
                curve.append((done, val_dice))
                if val_dice > best["dice"]:
                    best = {"dice": val_dice, "step": done}
                    save_segmenter(model_path, model, plan, {**info, "step": done, "val_dice": val_dice})
            logged[-1]["val_dice"] = "" if val_dice is None else f"{val_dice:.4f}"
            for row, loss_value in zip(logged, losses):
                log.write(**{"val_dice": "", **row, "loss": f"{loss_value:.6f}"})
                board.scalars(row["step"], {"loss": loss_value, "lr": float(row["lr"])})
            block_end_s = float(logged[-1]["elapsed_s"])  # the steps since the last read, timed together
            step_time_s = (block_end_s - block_start_s) / len(logged)
            board.scalars(done, {"val_dice": val_dice, "step_time_s": step_time_s})
            block_start_s = block_end_s
            if save_now:
                meta = {"kind": "finetune", "best": best, "curve": curve,
                        "elapsed_s": time.perf_counter() - started}  # fmt: skip
                optimisation.save(checkpoints, done, config, meta)
            if stopping:  # even at the last step: the rerun writes last.safetensors and scores the test split
                break
            if val_dice is not None and stop is not None and stop(curve):
                break
            if save_now and done < config.steps and pause is not None and pause():
                paused = True
                break
    bar.close()
    interrupted = signals.interruption(done, checkpoints.folder(done))
    if paused or interrupted:  # resumable from the checkpoint just saved: nothing final is written or scored
        barrier(dist_info)  # a rank that exited now would make torchrun stop rank 0 during its save
        return FinetuneResult(out, model_path, last_path, best["dice"], best["step"], curve, splits.to_dict(),
                              None, None, time.perf_counter() - started, paused=True,
                              interrupted=interrupted)  # fmt: skip
    barrier(dist_info)

    test_dice = test_hd95 = None
    if dist_info.is_main:
        save_segmenter(last_path, model, plan, {**info, "step": done})
        if config.evaluate_test:
            test_dice, test_hd95 = evaluate_saved(
                model_path, run.cache, splits.test, crop, plan, device, run.precision, best["step"],
                pictures=out / "test_pictures",
            )  # fmt: skip
            atomic_write_text(
                out / "test_scores.json", json.dumps({"dice": test_dice, "hd95": test_hd95}, indent=2)
            )
    # Only rank 0 validated and tested; every rank returns its results.
    best, curve, test_dice, test_hd95 = broadcast_from_main((best, curve, test_dice, test_hd95), dist_info)
    return FinetuneResult(out, model_path, last_path, best["dice"], best["step"], curve, splits.to_dict(),
                          test_dice, test_hd95, time.perf_counter() - started)  # fmt: skip


def evaluate_saved(
    path: Path,
    cache: Path,
    cases: list[str],
    crop,
    plan: dict,
    device,
    precision: str,
    step: int | None = None,
    pictures: Path | None = None,
):
    """(Dice summary, HD95 summary) of a saved model on cached cases; with ``step``, the model must be
    the one saved at that training step (the run's best: a file left by an interrupted part of a
    resumed run that the replay did not write again is refused, not scored); with ``pictures``, a PNG
    per case there (reference and prediction outlines, Dice in the title)."""
    from ..models.pretrained import load_segmenter

    model, _, info = load_segmenter(path)
    if step is not None and info.get("step") != step:
        raise RuntimeError(
            f"{path} holds the model of step {info.get('step')}, not the best validation step {step} "
            "recorded in the checkpoint it resumed from (an interrupted run saved a model the resumed "
            "one did not reach): delete the run's folder and run it again"
        )
    model.to(device)
    num_classes = model.config.num_classes
    scores = score_cases(
        model, cache, cases, crop, num_classes, plan["spacing"], device, precision, with_hd95=True,
        pictures=pictures,
    )  # fmt: skip
    return summarise(scores, "dice"), summarise(scores, "hd95")
