"""The data-efficiency study: does MAE pretraining help nnFormer with few labels, at matched compute?

``study(StudyConfig) -> StudyResult`` pretrains once (labels unused, test images excluded), then for
each labeled count and seed fine-tunes three arms on the same cases:

- ``mae``: from the MAE encoder, ``finetune_steps`` steps;
- ``scratch``: from random init, the same ``finetune_steps`` steps;
- ``scratch_matched``: from random init, ``pretrain_steps + finetune_steps`` steps -- matched in
  optimizer steps (not FLOPs: a sparse MAE step costs less than a dense fine-tuning step), so the
  measured wall-clock of every arm is reported beside it.

Model selection uses the fixed validation split; the numbers come from the separate test split
(and, with ``test_data``, from a separate labeled folder too). Resumable: each arm writes
``result.json`` atomically into its own folder and is skipped on rerun; an interrupted arm continues
from its last checkpoint; the encoder is reused if its file exists; ``max_hours`` stops cleanly (no
new run starts, a run in progress pauses at its next checkpoint). ``protocol="converged"`` runs the
converged study of ``study_converged`` instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data.cache import load_plan
from ..data.io import atomic_write_text
from ..train.finetune import FinetuneConfig, evaluate_saved, finetune
from ..train.pretrain import PretrainConfig, pretrain
from ..types import Triple
from .protocol import loss_flattening, machine, read_loss_curve

ARMS = ("mae", "scratch", "scratch_matched")
CONVERGED_ARMS = ("mae", "mae_short", "scratch")  # long and short pretraining, random init


@dataclass
class StudyConfig:
    """A data-efficiency study. ``labeled`` is a comma list of labeled-case counts (``all`` = the whole
    training pool); seeds are ``0 .. seeds-1`` (each seed picks its own labeled subset and init)."""

    data: str
    out: str
    report_dir: str | None = None  # tables, plots and report (default: ``out``)
    labeled: str = "5,10,20,all"
    seeds: int = 3
    arms: str = ",".join(ARMS)
    model: str = "small"
    crop_size: Triple | None = None
    batch_size: int = 2
    pretrain_steps: int = 400
    finetune_steps: int = 200
    val_every: int = 50
    max_val_cases: int | None = 12
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    exclude_test: bool = True  # pretrain on non-test images only
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None
    progress: bool = False
    report_only: bool = False  # rewrite tables/plots/report from the finished arms; train nothing
    test_data: str | None = None  # a separate labeled folder every arm's selected model is scored on
    max_hours: float | None = None  # stop after this many hours, at a checkpoint (rerun to continue)
    protocol: str = "fixed"  # "fixed" (the steps above) or "converged" (study_converged)
    # The converged protocol (pretrain_steps is its long budget):
    finetune_max_steps: int = 8000
    plateau_patience: int = 10
    plateau_min_delta: float = 0.005
    plateau_min_steps: int = 1000
    short_fraction: float = 0.1
    flatten_tolerance: float = 0.01
    encoder_stages: str = "3"
    mask_ratios: str = "0.6,0.75"
    tune_labeled: int = 2
    tune_seed: int = 100
    tune_lrs: str = "3e-4,1e-3,3e-3"
    tune_warmups: str = "100,1000"
    tune_layer_decays: str = "1.0,0.75"
    tune_freeze_steps: str = "0,500"
    tune_scratch_lrs: str = "2e-4,5e-4,1e-3,2e-3,3e-3,5e-3"
    tune_scratch_warmups: str = ""  # empty: the warmup the MAE search picks, not searched
    tune_scratch_weight_decays: str = ""  # empty: fine-tuning's default, not searched
    jobs: int = 1  # converged: tuning runs trained at once, each in its own process
    only_arm: str | None = None  # "SEED:ARM": run that one arm at each labeled count (tuning as usual)
    model_overrides: dict = field(default_factory=dict)  # Python API only (e.g. a tiny model in tests)


@dataclass
class StudyResult:
    """What ``study`` produced: the finished arms' rows, the pretraining record and the written files."""

    rows: list[dict]  # one per finished arm run; see ``study_report.TABLE_FIELDS``
    pretrain: dict  # encoder path, steps, wall time, cases seen (converged: one record per budget)
    files: dict[str, Path]  # table_csv, table_json, report, plots
    wall_time_s: float
    complete: bool = True  # False when max_hours stopped it before every arm had run


def parse_labeled(text: str) -> list[int | None]:
    """``"5,10,all"`` -> ``[5, 10, None]`` (None = the whole training pool)."""
    counts: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lower() != "all" and not part.isdigit():
            raise ValueError(f"--labeled {text!r}: {part!r} is neither a count nor 'all' (e.g. 5,10,all)")
        counts.append(None if part.lower() == "all" else int(part))
    if not counts:
        raise ValueError("--labeled: give at least one count, e.g. 5,10,all")
    return counts


def parse_list(text: str, kind: type = float) -> list:
    """``"1e-3, 3e-3"`` -> ``[0.001, 0.003]`` (each part converted by ``kind``)."""
    return [kind(p.strip()) for p in text.split(",") if p.strip()]


def parse_arms(text: str) -> list[str]:
    """``"mae,scratch"`` -> ``["mae", "scratch"]``, checked against ``ARMS``."""
    arms = parse_list(text, str)
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise ValueError(f"arms must be a comma list of {ARMS}, got {text!r}")
    return arms


def steps_to_fraction(
    curve: list[tuple[int, float]], fraction: float = 0.95, target: float | None = None
) -> int | None:
    """First validation step whose Dice reaches ``fraction`` of ``target`` (default: the curve's last
    Dice): how fast an arm gets near where it ends (or its best, or another arm's). None if there is no
    curve, the target is not positive (a collapsed run must not look fast) or the curve never reaches
    it."""
    if not curve:
        return None
    target = curve[-1][1] if target is None else target
    if target <= 0:
        return None
    return next((step for step, dice in curve if dice >= fraction * target), None)


def convergence_target(config: StudyConfig, best_val_dice: float) -> float | None:
    """The Dice an arm's ``steps_to_95`` is measured against: the fixed protocol's last validation
    (None), the converged protocol's best one -- the checkpoint it is scored at. (The mean of the
    plateau's validations would sit below the peak of a run that declines after it, and such a run
    would look fast.)"""
    return best_val_dice if config.protocol == "converged" else None


def run_pretraining(config: StudyConfig, folder: Path, data: Path, steps: int, overrides: dict,
                    mask_ratio: float = 0.75, deadline: Deadline | None = None) -> dict:  # fmt: skip
    """Pretrain once into ``folder`` on the cache ``data``, or reuse its finished encoder; returns the
    pretraining record (with the loss's flattening over the last tenth of the run, from its log).
    Raises :class:`Stopped` when ``deadline`` passed and the run paused at a checkpoint."""
    record_path = folder / "pretrain.json"
    encoder = folder / "encoder.safetensors"
    # The record names its encoder relative to its own folder (records of 2026-11 named it from the
    # working directory): the returned path is always the one in this study folder, wherever it is.
    if encoder.is_file() and record_path.is_file():
        return {**json.loads(record_path.read_text()), "encoder_path": str(encoder)}
    result = pretrain(PretrainConfig(
        data=str(data), out=str(folder), model=config.model, crop_size=config.crop_size,
        batch_size=config.batch_size, steps=steps, num_workers=config.num_workers, mask_ratio=mask_ratio,
        device=config.device, precision=config.precision, progress=config.progress, resume=True,
        checkpoint_every=checkpoint_every(steps), model_overrides=overrides, log_every=max(1, steps // 200),
        preview_every=max(1, steps // 4),
    ), pause=deadline and deadline.passed)  # fmt: skip
    if result.paused:
        raise Stopped(f"{folder}: paused at its last checkpoint")
    record = {
        "encoder_path": str(result.encoder_path.relative_to(folder)),
        "steps": result.steps,
        "mask_ratio": mask_ratio,
        "wall_time_s": result.wall_time_s,  # the whole run's clock, resumed parts included
        "final_loss": result.final_loss,
        "flattening": loss_flattening(*read_loss_curve(result.log_path)),
        "cases": len(load_plan(data)["cases"]),
        "test_excluded": config.exclude_test,
        "machine": machine(config.device),
    }
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return {**record, "encoder_path": str(encoder)}


def external_test_set(config: StudyConfig, out: Path, plan: dict) -> tuple[Path, list[str]] | None:
    """The preprocessing cache and labeled cases of ``config.test_data`` (None without one).

    A raw folder is preprocessed into ``OUT/test_data_cache`` at the training plan's spacing; its
    normalisation must be the training plan's (per-volume z-score; a CT set's own statistics are
    refused), so nothing about the training data is taken from it and nothing of it reaches training.
    """
    from ..data import ensure_preprocessed

    if not config.test_data:
        return None
    cache = ensure_preprocessed(config.test_data, out / "test_data_cache", target_spacing=plan["spacing"])
    external = load_plan(cache)
    for key in ("spacing", "normalization", "num_classes", "num_channels"):
        if external[key] != plan[key]:
            raise ValueError(f"--test-data {config.test_data}: its {key} {external[key]} is not the "
                             f"training data's {plan[key]}")  # fmt: skip
    cases = [c["id"] for c in external["cases"] if c["has_label"]]
    if not cases:
        raise ValueError(f"--test-data {config.test_data}: no labeled cases")
    return cache, cases


def score_external(config: StudyConfig, row: dict, folder: Path, external: tuple[Path, list[str]]) -> dict:
    """``row`` with the arm's selected model (``model.safetensors``) scored on the external test set:
    ``ext_test_dice_*``, ``ext_test_hd95_*`` and ``ext_test_cases``."""
    from ..device import pick_device, resolve_precision
    from ..models.config import get_config

    cache, cases = external
    device = pick_device(config.device)
    crop = tuple(config.crop_size or get_config(config.model).crop_size)
    precision = resolve_precision(config.precision, device)
    dice, hd95 = evaluate_saved(folder / "model.safetensors", cache, cases, crop, load_plan(cache), device,
                                precision, step=row["best_step"])  # fmt: skip
    return {**row, **{f"ext_test_dice_{k}": v for k, v in dice.items()},
            **{f"ext_test_hd95_{k}": v for k, v in hd95.items()}, "ext_test_cases": len(cases)}  # fmt: skip


def checkpoint_every(max_steps: int, most: int = 500) -> int:
    """Checkpoint interval of a run of at most ``max_steps``: a quarter of it, but at most ``most``
    steps, since an interrupted run restarts from its last checkpoint and a plateau rule may stop a
    fine-tuning run long before its maximum (scratch's maximum in the converged study is 28,000)."""
    return max(1, min(max_steps // 4, most))


@dataclass
class ArmSpec:
    """How one fine-tuning run trains: init encoder (None: scratch), maximum steps, the recipe (extra
    ``FinetuneConfig`` fields, e.g. lr, warmup_steps, layer_decay, freeze_encoder_steps,
    model_overrides), an early ``stop`` rule, and whether it is scored on the test split."""

    init: str | None
    steps: int
    recipe: dict = field(default_factory=dict)
    stop: Callable[[list[tuple[int, float]]], bool] | None = None
    evaluate_test: bool = True


def run_arm(config: StudyConfig, folder: Path, arm: str, labeled: int | None, seed: int, cache: Path,
            spec: ArmSpec, external: tuple[Path, list[str]] | None = None,
            deadline: Deadline | None = None) -> dict:  # fmt: skip
    """Fine-tune one arm (or load its finished result); returns its table row plus the curve. With an
    ``external`` test set, a finished arm not yet scored on it is scored and its result rewritten.
    Raises :class:`Stopped` when ``deadline`` passed and the run paused at a checkpoint."""
    result_path = folder / "result.json"
    if result_path.is_file():
        row = json.loads(result_path.read_text())
        if external and spec.evaluate_test and "ext_test_dice_mean" not in row:
            row = score_external(config, row, folder, external)
            atomic_write_text(result_path, json.dumps(row, indent=2))
        return row
    print(f"study: {folder} ...", flush=True)
    result = finetune(FinetuneConfig(**{
        "data": str(cache), "out": str(folder), "init": spec.init, "model": config.model,
        "crop_size": config.crop_size, "labeled": labeled, "seed": seed, "split_seed": config.split_seed,
        "val_fraction": config.val_fraction, "test_fraction": config.test_fraction, "steps": spec.steps,
        "batch_size": config.batch_size, "val_every": config.val_every,
        "max_val_cases": config.max_val_cases, "num_workers": config.num_workers,
        "precision": config.precision, "device": config.device,
        "checkpoint_every": checkpoint_every(spec.steps), "resume": True, "progress": config.progress,
        "model_overrides": config.model_overrides, "evaluate_test": spec.evaluate_test,
        "recipe": "none", **spec.recipe,  # the arm's recipe is the study's own: no defaults from recipes.py
    }), stop=spec.stop, pause=deadline and deadline.passed)  # fmt: skip
    if result.paused:
        raise Stopped(f"{folder}: paused at its last checkpoint")
    row = {
        "arm": arm,
        "labeled": len(result.splits["train"]),
        "seed": seed,
        "steps": result.curve[-1][0] if result.curve else spec.steps,  # an early stop: the steps it ran
        "max_steps": spec.steps,
        **{f"test_dice_{k}": v for k, v in (result.test_dice or {}).items()},
        **{f"test_hd95_{k}": v for k, v in (result.test_hd95 or {}).items()},
        "best_val_dice": result.best_val_dice,
        "best_step": result.best_step,
        "steps_to_95": steps_to_fraction(
            result.curve, target=convergence_target(config, result.best_val_dice)
        ),
        # The whole run's clock (resumed parts included): training, validations and the test scoring.
        "wall_time_s": result.wall_time_s,
        "curve": [list(point) for point in result.curve],
        "test_cases": len(result.splits["test"]),
        "val_cases": len(result.splits["val"][: config.max_val_cases or None]),
        "machine": machine(config.device),
        "recipe": {k: v for k, v in spec.recipe.items() if k != "model_overrides"},
    }
    if external and spec.evaluate_test:
        row = score_external(config, row, folder, external)
    atomic_write_text(result_path, json.dumps(row, indent=2))
    print(f"study: {arm} labeled={row['labeled']} seed={seed}: test Dice {row.get('test_dice_mean')}, "
          f"{row['wall_time_s']:.0f} s", flush=True)  # fmt: skip
    return row


class Deadline:
    """``passed()`` once ``hours`` have gone by since it was made (never with None): the study then
    starts no new run, a run in progress stops at its next checkpoint, and the study writes what it
    has; a rerun continues. The clock is the machine's monotonic one, shared by worker processes."""

    def __init__(self, hours: float | None) -> None:
        self.end = None if hours is None else time.monotonic() + hours * 3600

    def passed(self) -> bool:
        if self.end is None or time.monotonic() < self.end:
            return False
        print("study: --max-hours reached: no new run starts, a run in progress stops at its next "
              "checkpoint (rerun to continue)", flush=True)  # fmt: skip
        return True

    def check(self, record: Path) -> None:
        """Raise :class:`Stopped` if the deadline has passed and the run whose finished record is
        ``record`` has not finished: no new run starts (a paused one resumes in the next chunk)."""
        if not record.is_file() and self.passed():
            raise Stopped(f"{record.parent}: not started in this chunk")


class Stopped(Exception):
    """``--max-hours`` passed: the study stops (before its next run, or a run paused at a checkpoint)."""


def arm_order(
    seeds: int, counts: list[int | None], arms: list[str], only: str | None = None
) -> list[tuple[int, int | None, str]]:
    """(seed, labeled count, arm) in run order: seeds outermost, so a study stopped early holds
    complete, paired (count x arm) sets for its first seeds. ``only`` = "SEED:ARM" keeps that one arm
    at every count (``--only-arm``: several processes can then train the arms of one count side by
    side; each arm seeds itself and writes only its own folder)."""
    order = [(seed, labeled, arm) for seed in range(seeds) for labeled in counts for arm in arms]
    if only is None:
        return order
    seed_text, _, arm = only.partition(":")
    if not seed_text.isdigit() or int(seed_text) >= seeds or arm not in arms:
        raise ValueError(f"--only-arm {only!r}: give SEED:ARM with SEED below {seeds} and ARM one of {arms}")
    return [item for item in order if item[0] == int(seed_text) and item[2] == arm]


def arm_folder(out: Path, labeled: int | None, seed: int, arm: str) -> Path:
    """``OUT/runs/labeled-K/seed-S/ARM`` (K = ``all`` for the whole pool)."""
    return out / "runs" / f"labeled-{'all' if labeled is None else labeled}" / f"seed-{seed}" / arm
