"""The converged study's report (see ``study_converged``): each arm's convergence and compute in three
currencies, paired effects, and report.md with the choices, pretraining, arms and scratch at the MAE
arms' compute."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

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

COMPARISONS = (("mae", "scratch"), ("mae_short", "scratch"), ("mae", "mae_short"))
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


def dice_summary_table(summary: list[dict], effects: list[dict]) -> list[str]:
    """Markdown rows of the study's answer in one table: per labeled count, each arm's test Dice (mean
    ± std over seeds, from ``arm_summary``) and the paired test-Dice differences of ``COMPARISONS``
    (mean, t 95% interval, seeds on which the first arm did better, of the seeds paired)."""
    dice = {(s["labeled"], s["arm"]): cell(s["test_dice_mean"]) for s in summary}
    paired = {(e["labeled"], e["comparison"]): e for e in effects if e["metric"] == "test_dice_mean"}
    names = [f"{a} - {b}" for a, b in COMPARISONS]

    def difference(effect: dict | None) -> str:
        if effect is None or effect["mean_diff"] is None:
            return "n/a"
        spread = "" if effect["t_low"] is None else " " + interval(effect["t_low"], effect["t_high"], 3)
        return f"{effect['mean_diff']:+.3f}{spread} ({effect['wins']} of {effect['n_seeds']})"

    lines = [
        "| labeled | " + " | ".join((*CONVERGED_ARMS, *names)) + " |",
        "|---" * (1 + len(CONVERGED_ARMS) + len(names)) + "|",
    ]
    for labeled in sorted({s["labeled"] for s in summary}):
        cells = [dice.get((labeled, arm), "n/a") for arm in CONVERGED_ARMS]
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
    atomic_write_text(files["record"], strict_json(context))
    return rows, pretrained, files


def converged_report(
    rows: list[dict], pretrained: dict, config: StudyConfig, effects: list[dict], context: dict
) -> str:
    """report.md of the converged study: protocol, choices, pretraining, arms, effects, compute."""
    choices, flops = context["choices"], context["flops"]
    summary = arm_summary(rows)  # mean ± std per (labeled count, arm): the summary table and the arms table
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
        "## Test Dice",
        "",
        "Mean ± std over seeds; differences paired by seed: mean, t 95% interval, and on how many of the "
        'paired seeds the first arm did better (bootstrap intervals and p under "Paired differences '
        'over seeds").',
        "",
        *dice_summary_table(summary, effects),
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
