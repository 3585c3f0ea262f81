"""MAE pretraining of the nnFormer encoder: ``pretrain(PretrainConfig) -> PretrainResult``."""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.cache import cache_view, load_plan
from ..data.io import atomic_write_text
from ..device import autocast, resolve_compile
from ..models.config import get_config
from ..models.mae import MaskedAutoencoder, expand_units, patchify, unpatchify
from ..models.pretrained import save_encoder
from ..ops.masking import num_visible_units, visible_mask_grid
from ..seeds import derive_seed
from .checkpoint import CheckpointManager, unwrap
from .distributed import DistInfo, barrier, mean_across_ranks
from .loop import Optimisation, RunConfig, compiles_optimizer_step, prepare_model, setup_run
from .optim import make_optimizer, make_scheduler, param_groups, warmup_cosine
from .preemption import Interruption, StopSignals
from .previews import save_reconstruction_png
from .runtime import CsvLog, PendingLosses
from .splits import scored_cases
from .tensorboard import TensorBoardLog


@dataclass
class PretrainConfig(RunConfig):
    """A pretraining run: :class:`RunConfig`'s shared fields and the MAE's own; the defaults train the
    small config at a CPU-feasible pace. Labels in ``data``, if any, are never read."""

    mask_ratio: float = 0.75
    encoder: str = "sparse"  # "sparse" (visible-only MAE) or "dense" (SimMIM-style baseline)
    steps: int = 200
    warmup_steps: int | None = None  # default: 5% of steps
    optimizer: str = "adamw"  # "adamw" (betas 0.9, 0.95) or "sgd" (nesterov momentum 0.99, set lr)
    lr: float = 5e-4
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    norm_pix_loss: bool = True
    decoder_dim: int = 128
    decoder_depth: int = 2
    preview_every: int = 100
    log_every: int = 10
    # A split file (finetune's splits.json, nnunet-split's splits_final.maeformer.json) whose validation
    # and test cases pretraining leaves out, so that scores on them are not of images the encoder saw
    holdout: str | None = None


@dataclass
class PretrainResult:
    encoder_path: Path
    out: Path
    steps: int
    final_loss: float
    wall_time_s: float
    log_path: Path
    losses: list[float]
    paused: bool = False  # ended at a checkpoint by ``pause`` or a signal: no encoder yet, resume to finish
    interrupted: Interruption | None = None  # the signal that ended it (preemption.py)


def build_mae(config: PretrainConfig, in_channels: int | None = None) -> MaskedAutoencoder:
    """The masked autoencoder of ``config``; parameters the MAE loss never reaches are frozen.

    ``in_channels``: the data's channels (default: the model config's); ``model_overrides`` still win.

    The loss reads only the last encoder stage, so the output norms of the other stages (used by the
    segmentation decoder in fine-tuning) get no gradient: frozen, AdamW skips them exactly as it skips
    a parameter without gradient, and DDP needs no per-step search for unused parameters.
    """
    channels = {} if in_channels is None else {"in_channels": in_channels}
    model_config = get_config(config.model, **{**channels, **config.model_overrides})
    model = MaskedAutoencoder(
        model_config,
        encoder_mode=config.encoder,
        decoder_dim=config.decoder_dim,
        decoder_depth=config.decoder_depth,
        norm_pix_loss=config.norm_pix_loss,
    )
    for stage in model.encoder.stages[:-1]:
        stage.norm.requires_grad_(False)
    return model


def build_optimisation(
    config: PretrainConfig, model: MaskedAutoencoder, precision: str, device: torch.device
) -> Optimisation:
    """AdamW (betas 0.9, 0.95) or SGD with warmup + cosine, a gradient scaler for fp16, clipping,
    accumulation; tensor learning rates where the run compiles its optimizer step."""
    groups = param_groups(model, config.weight_decay)
    tensor_lr = compiles_optimizer_step(config, precision, device)
    optimizer = make_optimizer(config.optimizer, groups, config.lr, (0.9, 0.95), tensor_lr)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 20)
    scheduler = make_scheduler(
        optimizer, lambda s: warmup_cosine(s, config.steps, warmup, config.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return Optimisation(model, optimizer, scheduler, scaler, config.grad_clip, config.accumulate_steps)


def mae_loss(
    model: torch.nn.Module,
    images: torch.Tensor,
    visible_ids: torch.Tensor,
    precision: str,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked-unit loss, prediction (B, N, prod(unit) * C)) of images (B, C, Z, Y, X) with visible
    units (B, K), under the run's autocast."""
    with autocast(precision, device):
        return model(images, visible_ids)


def held_out_cache(cache: Path, split_file: str, out: Path, dist_info: DistInfo) -> Path:
    """``cache`` without the validation and test cases of ``split_file`` (:func:`scored_cases`): a view
    of it in ``out/pretrain_cases`` sharing its arrays. Every listed case must be in the cache, so that a
    split of another dataset (which would hold nothing out) is refused rather than ignored."""
    held = scored_cases(split_file)
    ids = {c["id"] for c in load_plan(cache)["cases"]}
    unknown = sorted(held - ids)
    if unknown:
        raise ValueError(
            f"{split_file}: {len(unknown)} of its validation and test cases are not in the data ({cache}), "
            f"e.g. {unknown[:3]}: a split of another dataset?"
        )
    view = out / "pretrain_cases"
    if dist_info.is_main:
        cache_view(cache, held, view)
        print(f"pretrain: the {len(held)} validation and test cases of {split_file} held out; pretraining "
              f"on the other {len(ids) - len(held)}", file=sys.stderr)  # fmt: skip
    barrier(dist_info)
    return view


def pretrain(config: PretrainConfig, pause: Callable[[], bool] | None = None) -> PretrainResult:
    """Pretrain; resumes from ``out/checkpoints`` when ``config.resume`` and a checkpoint exists.

    ``pause()``, asked after each checkpoint before the last step, ends the run there when it returns
    True (single process only; e.g. a time budget): the result says ``paused`` and no encoder is
    written; a resumed run continues from that checkpoint as if it had not stopped. A signal of
    ``config.stop_signals`` or SIGINT ends it the same way after the step it arrived in, with a
    checkpoint there, on every rank (the result's ``interrupted`` says which signal, and where)."""
    from ..data import make_loader

    run = setup_run(config)
    if pause is not None and run.dist.enabled:
        raise ValueError("pretrain: pause needs a single process (its decision is not shared across ranks)")
    device, precision, dist_info, out = run.device, run.precision, run.dist, run.out
    cache = held_out_cache(run.cache, config.holdout, out, dist_info) if config.holdout else run.cache

    torch.manual_seed(config.seed)
    model = build_mae(config, load_plan(run.cache)["num_channels"]).to(device)  # as fine-tuning's plan
    crop = tuple(config.crop_size or model.config.crop_size)
    unit_grid = model.encoder.unit_grid(crop)
    if num_visible_units(unit_grid, config.mask_ratio) == math.prod(unit_grid):
        raise ValueError(
            f"mask ratio {config.mask_ratio} hides none of the {math.prod(unit_grid)} mask units of a "
            f"{crop} crop: nothing to reconstruct (use at least {1 / math.prod(unit_grid):.3g})"
        )
    optimisation = build_optimisation(config, model, precision, device)
    checkpoints = CheckpointManager(out / "checkpoints", dist=dist_info)
    start_step, meta = optimisation.resume(checkpoints, config)
    earlier_s = meta.get("elapsed_s", 0.0)  # training time before a resume, so logs count the whole run
    train_model = prepare_model(model, dist_info, device, resolve_compile(config.compile, device),
                                config.activation_checkpointing, compile_mode=config.compile_mode,
                                optimisation=optimisation)  # fmt: skip
    micro_steps = config.accumulate_steps
    if dist_info.is_main:
        atomic_write_text(out / "pretrain_config.json", json.dumps(asdict(config), indent=2, default=str))
    log = None
    if dist_info.is_main:
        fields = ["step", "loss", "lr", "voxels_per_s", "elapsed_s"]
        log = CsvLog(out / "pretrain_log.csv", fields, resume_step=start_step or None)
    board = TensorBoardLog(out / "tensorboard", config.tensorboard and dist_info.is_main, start_step or None)

    loader = make_loader(
        cache, crop, config.batch_size, labeled=False, backend=config.loader, device=device,
        seed=config.seed, start_step=start_step * micro_steps, rank=dist_info.rank,
        world_size=dist_info.world_size, num_workers=config.num_workers,
        data_on_device=config.data_on_device, mask=(unit_grid, config.mask_ratio),
    )  # fmt: skip
    current: dict = {}  # the step's case ids and its last micro-batch (for the preview)

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        # The micro-batch counter is the loader position and seeds the masks (drawn by the loader on
        # the device) and stochastic depth (global RNG, seeded after the loader, whose first call
        # draws a worker seed): a resumed run repeats an uninterrupted one, and ranks and
        # micro-batches get different masks.
        index = step * micro_steps + micro
        batch = next(loader)
        torch.manual_seed(derive_seed(config.seed, dist_info.rank, index, "train"))
        images, visible_ids = batch["image"], batch["visible_ids"]
        loss, prediction = mae_loss(train_model, images, visible_ids, precision, device)
        current["case_ids"] = (current["case_ids"] if micro else []) + batch.get("case_ids", [])
        # A copy: a CUDA-graph replay (compile mode "reduce-overhead") reuses its output memory.
        current.update(images=images, visible_ids=visible_ids, prediction=prediction.detach().clone())
        return loss

    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="pretrain",
               disable=not (config.progress and dist_info.is_main), dynamic_ncols=True)  # fmt: skip
    pending = PendingLosses(dist_info.rank if dist_info.enabled else None)
    done = start_step
    with StopSignals(config.stop_signals, dist_info) as signals, board:
        for step in bar:
            local_loss = optimisation.accumulate(train_model, functools.partial(micro_loss, step))
            pending.add(step, mean_across_ranks(local_loss, dist_info), local_loss, current["case_ids"])
            optimisation.step()

            done = step + 1
            stopping = signals.requested()  # the same answer on every rank: all stop after this step
            log_now = done % config.log_every == 0 or done == config.steps
            save_now = done % config.checkpoint_every == 0 or done == config.steps or stopping
            if log_now or save_now:  # every rank reads at the same steps: a NaN stops them together
                losses += pending.read()
            if dist_info.is_main:
                if log_now:
                    session_s = time.perf_counter() - started
                    samples = config.batch_size * micro_steps * dist_info.world_size * (done - start_step)
                    voxels = math.prod(crop) * samples
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", vox_s=f"{voxels / session_s:,.0f}")
                    log.write(step=done, loss=f"{losses[-1]:.6f}", lr=f"{optimisation.lr:.3e}",
                              voxels_per_s=f"{voxels / session_s:.1f}",
                              elapsed_s=f"{earlier_s + session_s:.2f}")  # fmt: skip
                    board.scalars(done, {"loss": losses[-1], "lr": optimisation.lr,
                                         "voxels_per_s": voxels / session_s})  # fmt: skip
                if done % config.preview_every == 0 or done == config.steps:
                    preview = out / "previews" / f"step-{done:07d}.png"
                    save_preview(preview, model, current["images"], current["visible_ids"],
                                 current["prediction"])  # fmt: skip
                    board.image("reconstruction", preview, done)
            if dist_info.is_main and save_now:
                elapsed_s = earlier_s + time.perf_counter() - started
                optimisation.save(checkpoints, done, config, {"kind": "pretrain", "elapsed_s": elapsed_s})
                if done < config.steps and pause is not None and pause():
                    break
            if stopping:  # even at the last step: the encoder is written by the rerun
                break
    bar.close()

    encoder_path = out / "encoder.safetensors"
    interrupted = signals.interruption(done, checkpoints.folder(done))
    paused = done < config.steps or interrupted is not None
    if dist_info.is_main and not paused:
        info = {"mask_ratio": config.mask_ratio, "steps": config.steps, "encoder_mode": config.encoder,
                "data": str(config.data), "crop_size": list(crop)}  # fmt: skip
        save_encoder(encoder_path, unwrap(model).encoder, info)
    barrier(dist_info)
    return PretrainResult(
        encoder_path=encoder_path,
        out=out,
        steps=config.steps,
        final_loss=losses[-1] if losses else float("nan"),
        wall_time_s=earlier_s + time.perf_counter() - started,
        log_path=out / "pretrain_log.csv",
        losses=losses,
        paused=paused,
        interrupted=interrupted,
    )


@torch.no_grad()
def save_preview(
    path: Path,
    model: MaskedAutoencoder,
    images: torch.Tensor,
    visible_ids: torch.Tensor,
    prediction: torch.Tensor,
) -> None:
    """PNG of the first sample: input, visible units, and the reconstruction (visible units pasted)."""
    unit = model.config.total_stride
    unit_grid = model.encoder.unit_grid(tuple(images.shape[2:]))
    target = patchify(images[:1].float(), unit)
    predicted = prediction[:1].float()
    if model.norm_pix_loss:  # undo the per-unit target normalisation with the true units' statistics
        predicted = predicted * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    visible_units = visible_mask_grid(visible_ids[:1], unit_grid)
    mixed = torch.where(visible_units.flatten(1)[..., None], target, predicted)
    reconstruction = unpatchify(mixed, unit, unit_grid, images.shape[1])[0]
    visible_voxels = expand_units(visible_units, unit)[0]
    save_reconstruction_png(path, images[0], visible_voxels, reconstruction)
