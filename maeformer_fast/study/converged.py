"""The study at converged budgets (``maeformer study --protocol converged``): does MAE pretraining help
nnFormer with few labels once every arm has converged, and at matched compute?

Stages, each resumable (a finished run keeps its ``result.json`` / ``pretrain.json``); ``--max-hours``
stops the study cleanly anywhere (no new run starts, a run in progress pauses at its next checkpoint):

1. Pretext, chosen on validation Dice only: for every encoder layout (``encoder_stages``; 3 stages of
   the small config = total stride 8 = 96 mask units on a 32x48x32 crop) and mask ratio
   (``mask_ratios``), pretrain the short budget and fine-tune at ``tune_labeled`` cases, seed
   ``tune_seed``; the best validation Dice picks the layout and mask ratio every arm then uses.
2. Pretraining budgets on the non-test images: the long one (``pretrain_steps``) and the short one
   (``short_fraction`` of it, the run of stage 1). The long one's flattening criterion: the mean
   masked-unit loss over the last tenth of the steps is within ``flatten_tolerance`` (relative) of the
   mean over the tenth before; the report says whether it held. Pretraining's cosine schedule brings
   the lr near zero over those tenths, so the criterion says the run ended flat, not that more steps
   would not have helped: the short budget's arms measure what the budget changes downstream.
3. Counted FLOPs of one sparse pretraining step and one fine-tuning step (``bench.flops.step_flops``)
   convert pretraining into fine-tuning steps; scratch's maximum is the MAE maximum plus the
   pretraining budget in whichever currency gives more steps.
4. Recipes, chosen on validation Dice only: for the MAE encoder a coordinate search over lr, warmup,
   layer-wise lr decay and encoder freezing (each knob in turn, the others at their best so far);
   scratch by the same search over its learning rate (``tune_scratch_lrs``) and, where given, its
   warmup and weight decay (``tune_scratch_warmups``, ``tune_scratch_weight_decays``).
5. Arms per seed and labeled count: ``mae`` (long pretraining), ``mae_short`` and ``scratch``, each
   until its validation Dice has plateaued (``train.plateau.plateaued``: no gain above
   ``plateau_min_delta`` over the last ``plateau_patience`` validations, not before
   ``plateau_min_steps``) or its maximum, scored at its best-validation checkpoint on the test split
   (and ``--test-data``).

Every fine-tuning run here, tuning runs included, holds its peak learning rate after the warmup
(``LR_SCHEDULE``): the plateau rule decides how long a run trains, and a decay over the maximum would
tie the learning rate to that maximum -- scratch, whose maximum is larger, would still train at nearly
its peak when MAE runs, stopped at the same step, had annealed.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..bench.flops import step_flops
from ..data.cache import load_plan
from ..data.io import atomic_write_text
from ..models.config import get_config
from ..train.plateau import PlateauRule
from .common import (
    CONVERGED_ARMS,
    ArmSpec,
    Deadline,
    Stopped,
    StudyConfig,
    StudyResult,
    arm_folder,
    arm_order,
    parse_list,
    run_arm,
    run_pretraining,
)
from .converged_report import converged_outputs
from .protocol import encoder_overrides, mask_units, scratch_max_steps


class Converged:
    """The state of one converged study: settings, data, the deadline and the tuning record."""

    def __init__(
        self, config: StudyConfig, out: Path, cache: Path, data: Path, external: Any, deadline: Deadline
    ) -> None:
        self.config, self.out, self.cache, self.data = config, out, cache, data
        self.external, self.deadline = external, deadline
        self.crop = tuple(config.crop_size or get_config(config.model).crop_size)
        self.stop = PlateauRule(config.plateau_patience, config.plateau_min_delta, config.plateau_min_steps)
        self.short_steps = max(1, round(config.pretrain_steps * config.short_fraction))
        self.trials: list[dict] = []

    def overrides(self, stages: int) -> dict:
        return {**encoder_overrides(self.config.model, stages), **self.config.model_overrides}

    def pretrain(self, stages: int, ratio: float, steps: int) -> dict:
        folder = self.out / "pretrain" / f"stages-{stages}_mask-{ratio}_steps-{steps}"
        self.deadline.check(folder / "pretrain.json")
        return run_pretraining(self.config, folder, self.data, steps, self.overrides(stages), ratio,
                               self.deadline)  # fmt: skip

    def run_trials(self, batch: list[Trial]) -> list[float]:
        """Tuning runs (validation only, never scored on test) that do not depend on each other; returns
        each one's best validation Dice, in order. Up to ``config.jobs`` unfinished runs train at
        once, each in its own process; the deadline is checked before each one starts."""
        folders = [self.out / "tuning" / t.name for t in batch]
        todo = [(t, f) for t, f in zip(batch, folders) if not (f / "result.json").is_file()]
        if self.config.jobs > 1 and len(todo) > 1:
            self.run_in_parallel(todo)
        scores = []
        for trial, folder in zip(batch, folders):
            self.deadline.check(folder / "result.json")
            row = self.run_trial(trial, folder)
            self.trials.append(
                {
                    "stage": trial.stage,
                    "name": trial.name,
                    **trial.params,
                    "best_val_dice": row["best_val_dice"],
                    "best_step": row["best_step"],
                    "steps": row["steps"],
                    "wall_time_s": row["wall_time_s"],
                    "curve": row["curve"],
                }
            )
            atomic_write_text(self.out / "tuning.json", json.dumps(self.trials, indent=2))
            scores.append(row["best_val_dice"])
        return scores

    def run_trial(self, trial: Trial, folder: Path) -> dict:
        return run_arm(*self.trial_args(trial, folder))

    def trial_args(self, trial: Trial, folder: Path) -> tuple:
        """:func:`run_arm`'s arguments for ``trial``: the tuning labeled count and seed."""
        arm = trial.name.split("_")[0]
        config = self.config
        return (config, folder, arm, config.tune_labeled, config.tune_seed, self.cache, trial.spec, None,
                self.deadline)  # fmt: skip

    def run_in_parallel(self, todo: list[tuple[Trial, Path]]) -> None:
        """Train ``todo`` in ``config.jobs`` worker processes (spawned, with this process's torch
        thread count); the runs' records land in their folders, where :meth:`run_trials` reads them. No
        run starts after the deadline or once a run has failed or paused; the others finish (or pause)
        first. Then a run's error is raised here, before :class:`Stopped` from a run the deadline paused."""
        context = multiprocessing.get_context("spawn")
        threads = torch.get_num_threads()
        futures: list[Future] = []
        with ProcessPoolExecutor(self.config.jobs, context, torch.set_num_threads, (threads,)) as pool:
            for trial, folder in todo:
                running = [f for f in futures if not f.done()]
                if len(running) >= self.config.jobs:
                    wait(running, return_when=FIRST_COMPLETED)
                if any(f.done() and f.exception() is not None for f in futures) or self.deadline.passed():
                    break
                futures.append(pool.submit(run_arm, *self.trial_args(trial, folder)))
                futures[-1].add_done_callback(say_failure)
        errors = [f.exception() for f in futures if f.exception() is not None]
        failures = [e for e in errors if not isinstance(e, Stopped)]
        if failures or errors:
            raise (failures or errors)[0]


def say_failure(future: Future) -> None:
    """Print a tuning run's error as soon as it ends (the other runs go on first); a pause is none."""
    error = future.exception()
    if error is not None and not isinstance(error, Stopped):
        print(f"study: a tuning run failed: {error!r}", flush=True)


class Trial(NamedTuple):
    """One tuning run: its stage in the search, its folder name, how it trains, what it tries."""

    stage: str
    name: str
    spec: ArmSpec
    params: dict


LR_SCHEDULE = "constant"  # warmup, then the peak lr until the plateau rule stops the run (docstring)


def base_recipe(config: StudyConfig) -> dict:
    """The recipe before tuning: the middle learning rate, the first of every other knob's values."""
    lrs = parse_list(config.tune_lrs)
    return {
        "lr_schedule": LR_SCHEDULE,
        "lr": lrs[len(lrs) // 2],
        "warmup_steps": parse_list(config.tune_warmups, int)[0],
        "layer_decay": parse_list(config.tune_layer_decays)[0],
        "freeze_encoder_steps": parse_list(config.tune_freeze_steps, int)[0],
    }


def recipe_name(recipe: dict) -> str:
    return (
        f"lr-{recipe['lr']:g}_wu-{recipe['warmup_steps']}_ld-{recipe['layer_decay']:g}"
        f"_fr-{recipe['freeze_encoder_steps']}"
    )


def choose_pretext(run: Converged) -> tuple[int, float]:
    """(encoder stages, mask ratio) with the best validation Dice after the short pretraining."""
    config = run.config
    candidates = [
        (s, r) for s in parse_list(config.encoder_stages, int) for r in parse_list(config.mask_ratios)
    ]
    if len(candidates) == 1:
        return candidates[0]
    batch = []
    for stages, ratio in candidates:
        encoder = run.pretrain(stages, ratio, run.short_steps)["encoder_path"]
        recipe = {**base_recipe(config), "model_overrides": run.overrides(stages)}
        spec = ArmSpec(encoder, config.finetune_max_steps, recipe, run.stop, evaluate_test=False)
        name = f"mae_pretext_stages-{stages}_mask-{ratio}"
        batch.append(Trial("pretext", name, spec, {"encoder_stages": stages, "mask_ratio": ratio}))
    scores = dict(zip(candidates, run.run_trials(batch)))
    return max(candidates, key=lambda c: scores[c])  # ties: the first listed


def coordinate_search(
    run: Converged, knobs: dict[str, list], best: dict, trial: Callable[[str, dict], Trial]
) -> dict:
    """Coordinate search on validation Dice: each knob in turn over its values, the others at their best
    so far; ``trial(knob, recipe)`` makes the tuning run of a recipe. A recipe already run (same trial
    name) is not run again. Returns the best recipe (ties: the first run)."""
    scores: dict[str, tuple[float, dict]] = {}
    for knob, values in knobs.items():
        # One knob's values do not depend on each other: they run as one batch (in parallel with jobs).
        trials = {t.name: t for t in (trial(knob, {**best, knob: value}) for value in values)}
        batch = [t for name, t in trials.items() if name not in scores]
        for t, score in zip(batch, run.run_trials(batch)):
            scores[t.name] = (score, t.params)
        best = max(scores.values(), key=lambda item: item[0])[1]
    return best


def tune_mae(run: Converged, encoder: str, overrides: dict) -> dict:
    """Coordinate search of the MAE fine-tuning recipe on validation Dice; returns the best recipe."""
    config = run.config
    knobs = {
        "lr": parse_list(config.tune_lrs),
        "warmup_steps": parse_list(config.tune_warmups, int),
        "layer_decay": parse_list(config.tune_layer_decays),
        "freeze_encoder_steps": parse_list(config.tune_freeze_steps, int),
    }

    def trial(knob: str, recipe: dict) -> Trial:
        spec = ArmSpec(encoder, config.finetune_max_steps, {**recipe, "model_overrides": overrides},
                       run.stop, evaluate_test=False)  # fmt: skip
        return Trial("mae_recipe", f"mae_{recipe_name(recipe)}", spec, recipe)

    return coordinate_search(run, knobs, base_recipe(config), trial)


def tune_scratch(run: Converged, max_steps: int, overrides: dict, warmup: int) -> dict:
    """The scratch recipe with the best validation Dice, by the same coordinate search as MAE's: its
    learning rate (``tune_scratch_lrs``) at the MAE search's ``warmup``, then, where given, its warmup
    (``tune_scratch_warmups``) and weight decay (``tune_scratch_weight_decays``, the first the base).

    A run's name adds ``_wu-`` / ``_wd-`` only where it differs from that base, so the learning-rate
    runs keep the names of the study's first search (which tried learning rates only) and are not run
    again."""
    config = run.config
    weight_decays = parse_list(config.tune_scratch_weight_decays)
    base = {"lr_schedule": LR_SCHEDULE, "lr": 0.0, "warmup_steps": warmup}
    knobs = {"lr": parse_list(config.tune_scratch_lrs)}
    if config.tune_scratch_warmups:
        knobs["warmup_steps"] = parse_list(config.tune_scratch_warmups, int)
    if weight_decays:
        base["weight_decay"] = weight_decays[0]
        knobs["weight_decay"] = weight_decays

    def trial(knob: str, recipe: dict) -> Trial:
        name = f"scratch_lr-{recipe['lr']:g}"
        if recipe["warmup_steps"] != warmup:
            name += f"_wu-{recipe['warmup_steps']}"
        if recipe.get("weight_decay", base.get("weight_decay")) != base.get("weight_decay"):
            name += f"_wd-{recipe['weight_decay']:g}"
        recipe_here = {**recipe, "model_overrides": overrides}
        spec = ArmSpec(None, max_steps, recipe_here, run.stop, evaluate_test=False)
        return Trial("scratch_lr" if knob == "lr" else "scratch_recipe", name, spec, recipe)

    return coordinate_search(run, knobs, base, trial)


def count_flops(run: Converged, stages: int, ratio: float) -> dict:
    """Counted FLOPs per step of the chosen layout (cached in ``OUT/flops.json``)."""
    path = run.out / "flops.json"
    key = f"stages-{stages}_mask-{ratio}"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if key not in saved:
        plan = load_plan(run.cache)
        args = (
            run.config.model,
            run.overrides(stages),
            run.crop,
            run.config.batch_size,
            plan["num_channels"],
            plan["num_classes"],
        )
        saved[key] = {
            "pretrain_step": step_flops(*args, mask_ratio=ratio),
            "finetune_step": step_flops(*args, mask_ratio=None),
            "batch_size": run.config.batch_size,
            "crop": list(run.crop),
            "counted_on": "cpu (torch.utils.flop_counter)",
        }
        atomic_write_text(path, json.dumps(saved, indent=2))
    return saved[key]


def run_converged(
    config: StudyConfig,
    out: Path,
    cache: Path,
    data: Path,
    counts: list[int | None],
    external: Any,
    deadline: Deadline,
    started: float,
) -> StudyResult:
    """Run (or resume) the converged study's stages (module docstring) and write its report."""
    run = Converged(config, out, cache, data, external, deadline)
    rows: list[dict] = []
    complete = False
    try:
        stages, ratio = choose_pretext(run)
        overrides = run.overrides(stages)
        long = run.pretrain(stages, ratio, config.pretrain_steps)
        short = run.pretrain(stages, ratio, run.short_steps)
        flops = count_flops(run, stages, ratio)
        scratch_max = scratch_max_steps(
            config.finetune_max_steps, config.pretrain_steps, flops["pretrain_step"], flops["finetune_step"]
        )
        recipe = tune_mae(run, long["encoder_path"], overrides)
        scratch_recipe = tune_scratch(run, scratch_max, overrides, recipe["warmup_steps"])
        atomic_write_text(
            out / "choices.json",
            json.dumps(
                {
                    "encoder_stages": stages,
                    "mask_ratio": ratio,
                    "mask_units": mask_units(config.model, overrides, run.crop),
                    "mae_recipe": recipe,
                    "scratch_lr": scratch_recipe["lr"],
                    "scratch_recipe": scratch_recipe,
                    "scratch_max_steps": scratch_max,
                    "short_steps": run.short_steps,
                },
                indent=2,
            ),
        )
        specs = {
            "mae": ArmSpec(
                long["encoder_path"],
                config.finetune_max_steps,
                {**recipe, "model_overrides": overrides},
                run.stop,
            ),
            "mae_short": ArmSpec(
                short["encoder_path"],
                config.finetune_max_steps,
                {**recipe, "model_overrides": overrides},
                run.stop,
            ),
            "scratch": ArmSpec(
                None,
                scratch_max,
                {**scratch_recipe, "model_overrides": overrides},
                run.stop,
            ),
        }
        for seed, labeled, arm in arm_order(config.seeds, counts, list(CONVERGED_ARMS), config.only_arm):
            folder = arm_folder(out, labeled, seed, arm)
            deadline.check(folder / "result.json")
            rows.append(run_arm(config, folder, arm, labeled, seed, cache, specs[arm], external, deadline))
        complete = True
    except Stopped as stop:
        print(f"study: stopped: {stop}", flush=True)
    rows, pretrained, files = converged_outputs(config, out, rows) if rows else ([], {}, {})
    return StudyResult(rows, pretrained, files, time.perf_counter() - started, complete)
