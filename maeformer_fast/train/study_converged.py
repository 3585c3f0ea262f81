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
3. Counted FLOPs of one sparse pretraining step and one fine-tuning step (``study_protocol.step_flops``)
   convert pretraining into fine-tuning steps; scratch's maximum is the MAE maximum plus the
   pretraining budget in whichever currency gives more steps.
4. Recipes, chosen on validation Dice only: for the MAE encoder a coordinate search over lr, warmup,
   layer-wise lr decay and encoder freezing (each knob in turn, the others at their best so far);
   scratch tries as many learning rates (``tune_scratch_lrs``) as the MAE search ran recipes.
5. Arms per seed and labeled count: ``mae`` (long pretraining), ``mae_short`` and ``scratch``, each
   until its validation Dice has plateaued (``study_protocol.plateaued``: no gain above
   ``plateau_min_delta`` over the last ``plateau_patience`` validations, not before
   ``plateau_min_steps``) or its maximum, scored at its best-validation checkpoint on the test split
   (and ``--test-data``).

Every fine-tuning run here, tuning runs included, holds its peak learning rate after the warmup
(``LR_SCHEDULE``): the plateau rule decides how long a run trains, and a decay over the maximum would
tie the learning rate to that maximum -- scratch, whose maximum is larger, would still train at nearly
its peak when MAE runs, stopped at the same step, had annealed.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..data.cache import load_plan
from ..data.io import atomic_write_text
from ..models.config import get_config
from .study import (
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
    steps_to_fraction,
)
from .study_progress import plot_runs, pretrain_state
from .study_protocol import (
    best_within,
    encoder_overrides,
    mask_units,
    matched_steps,
    plateaued,
    scratch_max_steps,
    step_flops,
)
from .study_report import arm_summary, cell, effects_table, how_much_this_supports, write_outputs

COMPARISONS = (("mae", "scratch"), ("mae_short", "scratch"), ("mae", "mae_short"))
METRICS = ("test_dice_mean", "ext_test_dice_mean", "steps_to_95", "steps_to_scratch_95")


class Converged:
    """The state of one converged study: settings, data, the deadline and the tuning record."""

    def __init__(
        self, config: StudyConfig, out: Path, cache: Path, data: Path, external: Any, deadline: Deadline
    ) -> None:
        self.config, self.out, self.cache, self.data = config, out, cache, data
        self.external, self.deadline = external, deadline
        self.crop = tuple(config.crop_size or get_config(config.model).crop_size)
        self.stop = functools.partial(
            plateaued,
            patience=config.plateau_patience,
            min_delta=config.plateau_min_delta,
            min_steps=config.plateau_min_steps,
        )
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


def tune_mae(run: Converged, encoder: str, overrides: dict) -> dict:
    """Coordinate search of the MAE fine-tuning recipe on validation Dice; returns the best recipe."""
    config = run.config
    knobs = {
        "lr": parse_list(config.tune_lrs),
        "warmup_steps": parse_list(config.tune_warmups, int),
        "layer_decay": parse_list(config.tune_layer_decays),
        "freeze_encoder_steps": parse_list(config.tune_freeze_steps, int),
    }
    best, scores = base_recipe(config), {}
    for knob, values in knobs.items():
        # One knob's values do not depend on each other: they run as one batch (in parallel with jobs).
        recipes = {recipe_name(r): r for r in ({**best, knob: value} for value in values)}
        new = {name: recipe for name, recipe in recipes.items() if name not in scores}
        batch = []
        for name, recipe in new.items():
            spec = ArmSpec(encoder, config.finetune_max_steps, {**recipe, "model_overrides": overrides},
                           run.stop, evaluate_test=False)  # fmt: skip
            batch.append(Trial("mae_recipe", f"mae_{name}", spec, recipe))
        for (name, recipe), score in zip(new.items(), run.run_trials(batch)):
            scores[name] = (score, recipe)
        best = max(scores.values(), key=lambda item: item[0])[1]  # ties: the first run
    return best


def tune_scratch(run: Converged, max_steps: int, overrides: dict, warmup: int) -> float:
    """The scratch learning rate with the best validation Dice."""
    lrs = parse_list(run.config.tune_scratch_lrs)
    batch = []
    for lr in lrs:
        recipe = {"lr_schedule": LR_SCHEDULE, "lr": lr, "warmup_steps": warmup, "model_overrides": overrides}
        spec = ArmSpec(None, max_steps, recipe, run.stop, evaluate_test=False)
        batch.append(Trial("scratch_lr", f"scratch_lr-{lr:g}", spec, {"lr": lr}))
    scores = dict(zip(lrs, run.run_trials(batch)))
    return max(lrs, key=scores.get)  # ties: the first listed


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
        scratch_lr = tune_scratch(run, scratch_max, overrides, recipe["warmup_steps"])
        atomic_write_text(
            out / "choices.json",
            json.dumps(
                {
                    "encoder_stages": stages,
                    "mask_ratio": ratio,
                    "mask_units": mask_units(config.model, overrides, run.crop),
                    "mae_recipe": recipe,
                    "scratch_lr": scratch_lr,
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
                {
                    "lr_schedule": LR_SCHEDULE,
                    "lr": scratch_lr,
                    "warmup_steps": recipe["warmup_steps"],
                    "model_overrides": overrides,
                },
                run.stop,
            ),
        }
        for seed, labeled, arm in arm_order(config.seeds, counts, list(CONVERGED_ARMS)):
            folder = arm_folder(out, labeled, seed, arm)
            deadline.check(folder / "result.json")
            rows.append(run_arm(config, folder, arm, labeled, seed, cache, specs[arm], external, deadline))
        complete = True
    except Stopped as stop:
        print(f"study: stopped: {stop}", flush=True)
    rows, pretrained, files = converged_outputs(config, out, rows) if rows else ([], {}, {})
    return StudyResult(rows, pretrained, files, time.perf_counter() - started, complete)


def with_convergence(rows: list[dict]) -> list[dict]:
    """Rows with their fine-tuning convergence, derived from each validation curve: ``steps_to_95``,
    the first step at 95% of the arm's own best validation Dice (the checkpoint it is scored at), and
    ``steps_to_scratch_95``, the first step at 95% of the same seed's scratch arm's best -- one target
    for every arm of a seed (None where that seed has no scratch arm yet or the curve never gets
    there). Derived here rather than read from the records, which the study's first arms wrote
    against the mean of the plateau's validations."""
    scratch = {(r["labeled"], r["seed"]): r["best_val_dice"] for r in rows if r["arm"] == "scratch"}
    out = []
    for row in rows:
        target = scratch.get((row["labeled"], row["seed"]))
        out.append(
            {
                **row,
                "steps_to_95": steps_to_fraction(row["curve"], target=row["best_val_dice"]),
                "steps_to_scratch_95": None
                if target is None
                else steps_to_fraction(row["curve"], target=target),
            }
        )
    return out


def with_compute(rows: list[dict], pretrained: dict, flops: dict) -> list[dict]:
    """Rows with each arm's compute in three currencies, pretraining included: optimizer steps,
    counted FLOPs (``total_flops``, ``total_gflops``) and wall-clock seconds; and, for scratch, each MAE
    arm's budget (``scratch_budget_<arm>_steps``: its total steps; ``_flops``: the fine-tuning steps
    its total FLOPs buy) with scratch's best validation Dice within it (``scratch_val_within_<arm>_...``)."""
    out = []
    for row in rows:
        pre = pretrained.get(row["arm"], {"steps": 0, "wall_time_s": 0.0})
        total_flops = pre["steps"] * flops["pretrain_step"] + row["steps"] * flops["finetune_step"]
        out.append(
            {
                **row,
                "pretrain_steps": pre["steps"],
                "total_steps": pre["steps"] + row["steps"],
                "total_flops": total_flops,
                "total_gflops": total_flops / 1e9,
                "total_wall_s": pre["wall_time_s"] + row["wall_time_s"],
            }
        )
    by_key = {(r["arm"], r["labeled"], r["seed"]): r for r in out}
    for row in out:
        if row["arm"] != "scratch":
            continue
        for arm in ("mae", "mae_short"):
            mae = by_key.get((arm, row["labeled"], row["seed"]))
            if mae is None:
                continue
            budgets = {
                "steps": mae["total_steps"],
                "flops": matched_steps(mae["total_flops"], flops["finetune_step"]),
            }
            for currency, budget in budgets.items():
                row[f"scratch_budget_{arm}_{currency}"] = budget
                row[f"scratch_val_within_{arm}_{currency}"] = best_within(row["curve"], budget)
    return out


def converged_outputs(
    config: StudyConfig, out: Path, rows: list[dict]
) -> tuple[list[dict], dict, dict[str, Path]]:
    """The report of the finished arms: tables, effects, plots (Dice, curves, pretraining loss) and
    report.md in ``report_dir``; returns (rows with compute, pretraining records by arm, files)."""
    choices = json.loads((out / "choices.json").read_text())
    folder = f"stages-{choices['encoder_stages']}_mask-{choices['mask_ratio']}"
    flops = json.loads((out / "flops.json").read_text())[folder]
    records = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("pretrain/*/pretrain.json"))}
    pretrained = {
        "mae": records[f"{folder}_steps-{config.pretrain_steps}"],
        "mae_short": records[f"{folder}_steps-{choices['short_steps']}"],
    }
    rows = with_compute(with_convergence(rows), pretrained, flops)
    trials = json.loads((out / "tuning.json").read_text()) if (out / "tuning.json").is_file() else []
    context = {"choices": choices, "flops": flops, "pretraining": records, "tuning": trials}
    report_dir = Path(config.report_dir or out)
    arms = [a for a in CONVERGED_ARMS if any(r["arm"] == a for r in rows)]
    report = functools.partial(converged_report, context=context)
    files = write_outputs(rows, pretrained, config, arms, report_dir, COMPARISONS, METRICS, report)
    files["pretrain_plot"] = report_dir / "pretrain_loss.png"
    runs = [pretrain_state(out / "pretrain" / name) for name in records]
    plot_runs(runs, "masked-unit loss (norm-pix)", files["pretrain_plot"], log_x=True)
    files["record"] = report_dir / "study_record.json"  # choices, FLOPs, pretraining runs, tuning trials
    atomic_write_text(files["record"], json.dumps(context, indent=2))
    return rows, pretrained, files


def converged_report(
    rows: list[dict], pretrained: dict, config: StudyConfig, effects: list[dict], context: dict
) -> str:
    """report.md of the converged study: protocol, choices, pretraining, arms, effects, compute."""
    choices, flops = context["choices"], context["flops"]
    lines = [
        "# The study at converged budgets: MAE (long, short pretraining) vs scratch",
        "",
        f"Model `{config.model}` with {choices['encoder_stages']} encoder stages "
        f"({choices['mask_units']} mask units per {'x'.join(map(str, flops['crop']))} crop), "
        f"mask ratio {choices['mask_ratio']}, batch {config.batch_size}. Every arm trains until its "
        f"validation Dice has plateaued (no gain above {config.plateau_min_delta} over the last "
        f"{config.plateau_patience} validations, every {config.val_every} steps, not before step "
        f"{config.plateau_min_steps}) or its maximum (MAE arms {config.finetune_max_steps}, scratch "
        f"{choices['scratch_max_steps']}), scored at its best-validation checkpoint. Validation on "
        f"{rows[0]['val_cases']} fixed cases, test on {rows[0]['test_cases']} (split seed "
        f"{config.split_seed}).",
        "",
        "## Choices (validation Dice only)",
        "",
        f"MAE recipe {choices['mae_recipe']}; scratch lr {choices['scratch_lr']}. Trials (labeled "
        f"{config.tune_labeled}, seed {config.tune_seed}):",
        "",
        "| stage | run | best val Dice | at step | steps run |",
        "|---|---|---|---|---|",
        *(
            f"| {t['stage']} | {t['name']} | {t['best_val_dice']:.4f} | {t['best_step']} | {t['steps']} |"
            for t in context["tuning"]
        ),
        "",
        "## Pretraining (non-test images; curves: `pretrain_loss.png`)",
        "",
        "Flattened = the mean loss over the last tenth of the steps is within "
        f"{config.flatten_tolerance:.1%} of the mean over the tenth before. Pretraining's cosine schedule "
        "brings the learning rate near zero over those tenths, so every run, short ones included, ends "
        "flat: the column says the run ended flat, not that more steps would not have lowered the loss; "
        "the short budget's arms measure what the budget changes downstream.",
        "",
        "| run | steps | final loss | relative drop, last tenth | flattened | wall (s) | machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in context["pretraining"].items():
        drop = r["flattening"]["relative_drop"]
        flat = (
            "n/a (too few logged steps)"
            if drop != drop
            else "yes"
            if drop <= config.flatten_tolerance
            else "no"
        )
        lines.append(
            f"| {name} | {r['steps']} | {r['final_loss']:.4f} | {drop:.4f} | {flat} | "
            f"{r['wall_time_s']:.0f} | {r.get('machine', '?')} |"
        )
    reached = Counter((r["labeled"], r["arm"]) for r in rows if r["steps_to_scratch_95"] is not None)
    lines += [
        "",
        f"Counted FLOPs per step ({flops['counted_on']}, batch {flops['batch_size']}): sparse pretraining "
        f"{flops['pretrain_step'] / 1e9:.3f} GFLOPs, fine-tuning {flops['finetune_step'] / 1e9:.3f} GFLOPs.",
        "",
        "## Arms (mean ± std over seeds)",
        "",
        "Convergence, in fine-tuning steps (pretraining not included): the first validation at 95% of "
        "the arm's own best validation Dice, and at 95% of the same seed's scratch arm's best (one target "
        "for every arm of a seed; mean over the seeds that reached it, how many did in brackets).",
        "",
        "| labeled | arm | seeds | test Dice | external test Dice | best val Dice | best step | steps run "
        "| steps to 95% of own best | steps to 95% of scratch's best | total steps | total GFLOPs "
        "| total wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in arm_summary(rows):
        lines.append(
            f"| {s['labeled']} | {s['arm']} | {s['n_seeds']} | {cell(s['test_dice_mean'])} | "
            f"{cell(s['ext_test_dice_mean'])} | {cell(s['best_val_dice'])} | {cell(s['best_step'], 0)} | "
            f"{cell(s['steps'], 0)} | {cell(s['steps_to_95'], 0)} | {cell(s['steps_to_scratch_95'], 0)} "
            f"({reached[(s['labeled'], s['arm'])]}/{s['n_seeds']}) | {cell(s['total_steps'], 0)} | "
            f"{cell(s['total_gflops'], 1)} | {cell(s['total_wall_s'], 0)} |"
        )
    lines += [
        "",
        "Totals include each arm's pretraining: steps, counted FLOPs and wall-clock on the machine (and "
        "load) in results.csv. Every MAE fine-tuning step is counted as a whole dense step, the "
        "frozen-encoder ones too (their skipped encoder backward is not subtracted: this favours "
        "scratch). An MAE arm's wall-clock includes the whole one-off pretraining that every arm of its "
        "budget shares: do not add totals across arms. Validation and test scoring are in the "
        "wall-clock, not in the FLOPs.",
        "",
        "## Paired differences over seeds",
        "",
        "Paired by seed (same labeled subset, same validation and test cases); steps: lower is better.",
        "",
        *effects_table(effects, with_metric=True),
        "",
        how_much_this_supports(max((e["n_seeds"] for e in effects), default=0)),
        "",
        "## Scratch at the MAE arms' compute (validation Dice, from its curve)",
        "",
        "Each MAE arm's total compute (pretraining + fine-tuning) as fine-tuning steps, counted in "
        "optimizer steps and in FLOPs, and scratch's best validation Dice within it. Where scratch ran "
        "fewer steps than a budget it had stopped on the plateau rule with more steps allowed (its "
        f"maximum: {choices['scratch_max_steps']}), so its best within the budget is its overall best "
        "and the paired test Dice above is already a comparison at matched compute, one that favours "
        "scratch. The control is as strong as the plateau rule. Best validation Dice is a maximum over "
        "noisy validations, which favours the arm validated more often.",
        "",
        "| labeled | seed | vs | budget (steps) | budget (FLOPs, as steps) | scratch ran | scratch best val "
        "within steps | within FLOPs | the arm's best val |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["arm"], r["labeled"], r["seed"]): r for r in rows}
    for r in (r for r in rows if r["arm"] == "scratch"):
        for arm in ("mae", "mae_short"):
            mae = by_key.get((arm, r["labeled"], r["seed"]))
            if mae is None:
                continue
            within = [r[f"scratch_val_within_{arm}_{c}"] for c in ("steps", "flops")]
            lines.append(
                f"| {r['labeled']} | {r['seed']} | {arm} | {r[f'scratch_budget_{arm}_steps']} | "
                f"{r[f'scratch_budget_{arm}_flops']} | {r['steps']} | "
                + " | ".join("n/a" if v is None else f"{v:.4f}" for v in within)
                + f" | {mae['best_val_dice']:.4f} |"
            )
    lines += [
        "",
        "Plots: `test_dice_vs_labeled.png`; `val_dice_vs_step.png` (mean over seeds at the steps every "
        "seed reached, so cut at the shortest run; band: the seeds' range); `pretrain_loss.png`.",
        "",
    ]
    return "\n".join(lines)
