"""The converged study's report (see ``study_converged``): each arm's convergence and compute in three
currencies, paired effects, and report.md with the choices, pretraining, arms and scratch at the MAE
arms' compute.

When scratch's recipe was re-tuned, its first recipe's arms were moved to ``SUPERSEDED_SCRATCH``
while the ``scratch`` arms are rerun: the report reads them as the arm ``OLD_SCRATCH`` beside the new
ones (``mae - scratch`` against the re-tuned recipe, ``mae - OLD_SCRATCH`` against the first), says
how many new scratch arms have finished, which recipe validated better per labeled count, and what
each recipe's tuning cost."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..data.io import atomic_write_text
from .common import CONVERGED_ARMS, StudyConfig, steps_to_fraction
from .progress import plot_runs, pretrain_state
from .protocol import best_within, matched_steps
from .report import (
    arm_summary,
    cell,
    effects_table,
    how_much_this_supports,
    interval,
    strict_json,
    write_outputs,
)

OLD_SCRATCH = "scratch_lr5e-3"  # the arm name of the first scratch recipe's arms (their records say scratch)
SUPERSEDED_SCRATCH = "superseded/scratch_lr-0.005"  # where they were moved, under OUT, for the rerun
# Comparisons of an arm with no rows are left out (write_outputs): without OLD_SCRATCH, the first three.
COMPARISONS = (("mae", "scratch"), ("mae_short", "scratch"), ("mae", "mae_short"), ("mae", OLD_SCRATCH))
METRICS = ("test_dice_mean", "ext_test_dice_mean", "steps_to_95", "steps_to_scratch_95")


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


def superseded_scratch_rows(out: Path) -> list[dict]:
    """The first scratch recipe's finished arms, under ``OUT/SUPERSEDED_SCRATCH`` in the layout of
    ``OUT/runs``, as the arm ``OLD_SCRATCH`` (their records say ``scratch``, which now names the rerun),
    by seed and labeled count as ``run.finished_study`` orders the study's rows."""
    paths = (out / SUPERSEDED_SCRATCH).glob("runs/labeled-*/seed-*/scratch/result.json")
    rows = [{**json.loads(p.read_text()), "arm": OLD_SCRATCH} for p in paths]
    return sorted(rows, key=lambda r: (r["seed"], r["labeled"]))


def scratch_tuning(out: Path, trials: list[dict], choices: dict, old_recipe: dict) -> dict[str, Any]:
    """The tuning budgets behind the two scratch recipes, from the records: the MAE side's runs by stage,
    scratch's runs and the values they tried, how many of them the first search made, and each
    recipe with its tuning run's best validation Dice (None where no run matches it).

    ``trials`` (``tuning.json``) is extended by ``scratch_search_tuning.json`` where present (the
    records kept the later search's list apart until the arms were rerun). The first search tried
    learning rates alone, before weight decay was one of scratch's knobs: its runs' own records
    (``tuning/NAME/result.json``) name the knobs the old arms' recipe names and no more."""
    named = {t["name"]: t for t in trials}
    extra = out / "scratch_search_tuning.json"
    if extra.is_file():
        named.update((t["name"], t) for t in json.loads(extra.read_text()))
    scratch = [t for t in named.values() if t["stage"].startswith("scratch")]

    def knobs(name: str) -> set[str]:
        record = out / "tuning" / name / "result.json"
        return set(json.loads(record.read_text()).get("recipe", {})) if record.is_file() else set()

    def val_dice(recipe: dict) -> float | None:
        runs = (t for t in scratch if all(t.get(k) == v for k, v in recipe.items()))
        return next((t["best_val_dice"] for t in runs), None)

    def tried(key: str) -> list:
        return sorted({t[key] for t in scratch if t.get(key) is not None})

    return {
        "mae_runs": dict(Counter(t["stage"] for t in named.values() if not t["stage"].startswith("scratch"))),
        "scratch_runs": len(scratch),
        "first_search_runs": sum(knobs(t["name"]) == set(old_recipe) for t in scratch),
        "tried": {key: tried(key) for key in ("lr", "warmup_steps", "weight_decay")},
        "recipe": choices["scratch_recipe"],
        "recipe_val_dice": val_dice(choices["scratch_recipe"]),
        "old_recipe": old_recipe,
        "old_recipe_val_dice": val_dice(old_recipe),
    }


def describe_recipe(recipe: dict, val_dice: float | None) -> str:
    """A recipe's knobs (those it names) and its tuning run's validation Dice, e.g. "lr 0.02, warmup 1000,
    weight decay 0.01; validation Dice 0.804"."""
    names = {"lr": "lr", "warmup_steps": "warmup", "weight_decay": "weight decay"}
    text = ", ".join(f"{name} {recipe[key]:g}" for key, name in names.items() if key in recipe)
    return text if val_dice is None else f"{text}; validation Dice {val_dice:.3f}"


def scratch_recipes(tuning: dict, config: StudyConfig) -> str:
    """The protocol's paragraph on tuning-budget parity: the runs behind MAE's recipe and scratch's two
    (``scratch_tuning``)."""
    mae = tuning["mae_runs"]
    grid = ", ".join(
        f"{name} {{{', '.join(f'{v:g}' for v in tuning['tried'][key])}}}"
        for key, name in (("lr", "lr"), ("warmup_steps", "warmup"), ("weight_decay", "weight decay"))
    )
    first, runs = tuning["first_search_runs"], tuning["scratch_runs"]
    old = describe_recipe(tuning["old_recipe"], tuning["old_recipe_val_dice"])
    searches = (  # a first search's runs are recognised by their records (tuning/NAME/result.json)
        f"{first} in a first search over learning rates alone, whose choice ({old}) the superseded arms "
        f"`{OLD_SCRATCH}` ran with, and {runs - first} more in a second"
        if first
        else f"the superseded arms `{OLD_SCRATCH}` ran with {old}"
    )
    return (
        f"Tuning budgets (validation Dice only; labeled {config.tune_labeled}, seed {config.tune_seed}): "
        f"the MAE recipe came from {sum(mae.values())} runs ("
        + ", ".join(f"{n} {stage}" for stage, n in mae.items())
        + f"), scratch's from {runs} ({grid}): {searches}. `scratch` runs the recipe chosen from all of "
        f"them: {describe_recipe(tuning['recipe'], tuning['recipe_val_dice'])}."
    )


def validation_baseline(summary: list[dict]) -> str:
    """Per labeled count, which scratch recipe (``scratch`` or ``OLD_SCRATCH``) reached the higher mean
    best validation Dice over its finished arms: the stronger baseline, chosen without the test split."""
    best_val = {(s["labeled"], s["arm"]): s["best_val_dice"][0] for s in summary}
    picks = []
    for labeled in sorted({labeled for labeled, _ in best_val}):
        new, old = best_val.get((labeled, "scratch")), best_val.get((labeled, OLD_SCRATCH))
        if new is None or old is None:
            continue
        arm = "scratch" if new > old else OLD_SCRATCH
        picks.append(f"{labeled} `{arm}` ({max(new, old):.3f} against {min(new, old):.3f})")
    return (
        "The scratch recipe with the higher mean best validation Dice, per labeled count (the stronger "
        "baseline, chosen without the test split): " + "; ".join(picks) + "."
    )


def dice_summary_table(summary: list[dict], effects: list[dict], old_label: str = OLD_SCRATCH) -> list[str]:
    """Markdown rows of the study's answer in one table: per labeled count, each arm's test Dice (mean
    ± std over seeds, from ``arm_summary``) and the paired test-Dice differences of ``COMPARISONS``
    (mean, t 95% interval, seeds on which the first arm did better, of the seeds paired).

    The superseded scratch arm (``OLD_SCRATCH``, headed ``old_label``) and its comparison have columns
    only where it has rows; with it (while scratch is rerun), an arm's cell over fewer seeds than its
    labeled count's most says over how many."""
    rerun = any(s["arm"] == OLD_SCRATCH for s in summary)
    arms = [*CONVERGED_ARMS, OLD_SCRATCH] if rerun else list(CONVERGED_ARMS)
    names = [f"{a} - {b}" for a, b in COMPARISONS if a in arms and b in arms]
    by_arm = {(s["labeled"], s["arm"]): s for s in summary}
    paired = {(e["labeled"], e["comparison"]): e for e in effects if e["metric"] == "test_dice_mean"}
    most: dict[int, int] = {}  # seeds of each labeled count's most complete arm
    for s in summary:
        most[s["labeled"]] = max(most.get(s["labeled"], 0), s["n_seeds"])

    def dice(labeled: int, arm: str) -> str:
        s = by_arm.get((labeled, arm))
        if s is None:
            return "n/a"
        fewer = rerun and s["n_seeds"] < most[labeled]
        return cell(s["test_dice_mean"]) + (f" ({s['n_seeds']} of {most[labeled]} seeds)" if fewer else "")

    def difference(effect: dict | None) -> str:
        if effect is None or effect["mean_diff"] is None:
            return "n/a"
        spread = "" if effect["t_low"] is None else " " + interval(effect["t_low"], effect["t_high"], 3)
        return f"{effect['mean_diff']:+.3f}{spread} ({effect['wins']} of {effect['n_seeds']})"

    headers = [old_label if arm == OLD_SCRATCH else arm for arm in arms]
    lines = [
        "| labeled | " + " | ".join((*headers, *names)) + " |",
        "|---" * (1 + len(arms) + len(names)) + "|",
    ]
    for labeled in sorted(most):
        cells = [dice(labeled, arm) for arm in arms]
        cells += [difference(paired.get((labeled, name))) for name in names]
        lines.append(f"| {labeled} | " + " | ".join(cells) + " |")
    return lines


def converged_outputs(
    config: StudyConfig, out: Path, rows: list[dict]
) -> tuple[list[dict], dict, dict[str, Path]]:
    """The report of the finished arms: tables, effects, plots (Dice, curves, pretraining loss) and
    report.md in ``report_dir``; returns (rows with convergence and compute, pretraining records by
    arm, files)."""
    choices = json.loads((out / "choices.json").read_text())
    folder = f"stages-{choices['encoder_stages']}_mask-{choices['mask_ratio']}"
    flops = json.loads((out / "flops.json").read_text())[folder]
    records = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("pretrain/*/pretrain.json"))}
    pretrained = {
        "mae": records[f"{folder}_steps-{config.pretrain_steps}"],
        "mae_short": records[f"{folder}_steps-{choices['short_steps']}"],
    }
    old = superseded_scratch_rows(out)
    rows = with_compute(with_convergence(rows + old), pretrained, flops)  # old rows last: order kept
    trials = json.loads((out / "tuning.json").read_text()) if (out / "tuning.json").is_file() else []
    context = {"choices": choices, "flops": flops, "pretraining": records, "tuning": trials}
    if old:  # only then: the report of a study without a rerun stays as it was
        context["scratch_tuning"] = scratch_tuning(out, trials, choices, old[0]["recipe"])
    report_dir = Path(config.report_dir or out)
    arms = [a for a in (*CONVERGED_ARMS, OLD_SCRATCH) if any(r["arm"] == a for r in rows)]
    report = functools.partial(converged_report, context=context)
    files = write_outputs(rows, pretrained, config, arms, report_dir, COMPARISONS, METRICS, report)
    files["pretrain_plot"] = report_dir / "pretrain_loss.png"
    runs = [pretrain_state(out / "pretrain" / name) for name in records]
    plot_runs(runs, "masked-unit loss (norm-pix)", files["pretrain_plot"], log_x=True)
    files["record"] = report_dir / "study_record.json"  # choices, FLOPs, pretraining runs, tuning trials
    atomic_write_text(files["record"], strict_json(context))
    return rows, pretrained, files


def converged_report(
    rows: list[dict], pretrained: dict, config: StudyConfig, effects: list[dict], context: dict
) -> str:
    """report.md of the converged study: protocol, choices, pretraining, arms, effects, compute."""
    choices, flops = context["choices"], context["flops"]
    summary = arm_summary(rows)  # mean ± std per (labeled count, arm): the summary table and the arms table
    rerun_protocol, rerun_state, old_label = [], [], OLD_SCRATCH
    if "scratch_tuning" in context:  # the first scratch recipe's arms beside the rerun's
        old_recipe = context["scratch_tuning"]["old_recipe"]
        old_label = f"scratch, first recipe (lr {old_recipe['lr']:g})"
        finished = sum(r["arm"] == "scratch" for r in rows)
        cells = len({(r["labeled"], r["seed"]) for r in rows})  # every (labeled count, seed) with an arm
        rerun_protocol = [scratch_recipes(context["scratch_tuning"], config), ""]
        rerun_state = [
            f"scratch (re-tuned recipe): {finished} of {cells} arms finished. `{OLD_SCRATCH}`: the first "
            f"recipe's arms ({describe_recipe(old_recipe, None)}), kept: `mae - scratch` compares with the "
            f"re-tuned recipe, `mae - {OLD_SCRATCH}` with the first. Differences with either are paired "
            "over the seeds that have both arms.",
            "",
            validation_baseline(summary),
            "",
        ]
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
        *rerun_protocol,
        "## Test Dice",
        "",
        "Mean ± std over seeds; differences paired by seed: mean, t 95% interval, and on how many of the "
        'paired seeds the first arm did better (bootstrap intervals and p under "Paired differences '
        'over seeds").',
        "",
        *rerun_state,
        *dice_summary_table(summary, effects, old_label),
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
    with_scratch = {(r["labeled"], r["seed"]) for r in rows if r["arm"] == "scratch"}
    comparable = Counter((r["labeled"], r["arm"]) for r in rows if (r["labeled"], r["seed"]) in with_scratch)
    reached = Counter((r["labeled"], r["arm"]) for r in rows if r["steps_to_scratch_95"] is not None)

    def to_scratch(s: dict) -> str:  # steps to 95% of scratch's best, (reached / seeds with scratch)
        key = (s["labeled"], s["arm"])
        if not comparable[key]:
            return "n/a (no scratch arm yet)"
        return f"{cell(s['steps_to_scratch_95'], 0)} ({reached[key]}/{comparable[key]})"

    lines += [
        "",
        f"Counted FLOPs per step ({flops['counted_on']}, batch {flops['batch_size']}): sparse pretraining "
        f"{flops['pretrain_step'] / 1e9:.3f} GFLOPs, fine-tuning {flops['finetune_step'] / 1e9:.3f} GFLOPs.",
        "",
        "## Arms (mean ± std over seeds)",
        "",
        "Convergence, in fine-tuning steps (pretraining not included): the first validation at 95% of "
        "the arm's own best validation Dice, and at 95% of the same seed's scratch arm's best (one target "
        "for every arm of a seed; mean over the seeds that reached it, in brackets how many did of the "
        "seeds with a scratch arm).",
        "",
        "| labeled | arm | seeds | test Dice | external test Dice | best val Dice | best step | steps run "
        "| steps to 95% of own best | steps to 95% of scratch's best | total steps | total GFLOPs "
        "| total wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['labeled']} | {s['arm']} | {s['n_seeds']} | {cell(s['test_dice_mean'])} | "
            f"{cell(s['ext_test_dice_mean'])} | {cell(s['best_val_dice'])} | {cell(s['best_step'], 0)} | "
            f"{cell(s['steps'], 0)} | {cell(s['steps_to_95'], 0)} | {to_scratch(s)} | "
            f"{cell(s['total_steps'], 0)} | "
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
