"""Tables, plots and the Markdown report of a data-efficiency study (see ``study.py``)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import atomic_write_text

TABLE_FIELDS = [
    "arm", "labeled", "seed", "steps", "test_dice_1", "test_dice_2", "test_dice_mean", "test_hd95_1",
    "test_hd95_2", "test_hd95_mean", "best_val_dice", "best_step", "steps_to_95", "steps_to_scratch_95",
    "wall_time_s", "ext_test_dice_1", "ext_test_dice_2", "ext_test_dice_mean", "max_steps", "pretrain_steps",
    "total_steps", "total_gflops", "total_wall_s", "machine",
]  # fmt: skip
COMPARISONS = (("mae", "scratch"), ("mae", "scratch_matched"))
LOWER_IS_BETTER = frozenset({"steps_to_95", "steps_to_scratch_95", "test_hd95_mean"})
# Steps to reach a target: None on a run that never reached it -- a loss, not a missing value.
REACHED_METRICS = frozenset({"steps_to_95", "steps_to_scratch_95"})


def paired_effects(rows: list[dict], a: str, b: str, metric: str = "test_dice_mean",
                   resamples: int = 10000, seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Per labeled count: mean of the paired differences ``a - b`` over seeds where both arms have
    ``metric``, a percentile bootstrap 95% interval of that mean, the paired t-test's 95% interval and
    two-sided p, and how many seeds ``a`` did better, equal or worse on (lower is better for
    ``LOWER_IS_BETTER``). Intervals and p are None below 2 seeds or where the differences do not vary:
    there is no spread to estimate. For ``REACHED_METRICS`` a seed on which only one arm reached the
    target counts as better for that arm; it is not in the mean or the intervals (``not_reached_a`` /
    ``not_reached_b``: seeds on which only the other arm reached it)."""
    from scipy import stats

    runs = {(r["arm"], r["labeled"], r["seed"]): r.get(metric) for r in rows}
    effects = []
    for labeled in sorted({r["labeled"] for r in rows}):
        seeds = sorted(s for (arm, k, s) in runs if arm == a and k == labeled and (b, k, s) in runs)
        values = [(runs[(a, labeled, s)], runs[(b, labeled, s)]) for s in seeds]
        paired = [(va, vb) for va, vb in values if _present(va) and _present(vb)]
        censored = metric in REACHED_METRICS
        only_b = sum(censored and not _present(va) and _present(vb) for va, vb in values)
        only_a = sum(censored and _present(va) and not _present(vb) for va, vb in values)
        if not paired and not only_a + only_b:
            continue
        diffs = np.array([va - vb for va, vb in paired], dtype=float)
        better = -diffs if metric in LOWER_IS_BETTER else diffs
        effect: dict[str, Any] = {
            "comparison": f"{a} - {b}", "labeled": labeled, "n_seeds": len(paired),
            "mean_diff": float(diffs.mean()) if paired else None, "ci_low": None, "ci_high": None,
            "t_low": None, "t_high": None, "t_p": None, "wins": int((better > 0).sum()) + only_a,
            "ties": int((better == 0).sum()), "losses": int((better < 0).sum()) + only_b,
            "not_reached_a": only_b, "not_reached_b": only_a,
        }  # fmt: skip
        if len(paired) > 1 and diffs.std() > 0:
            rng = np.random.default_rng(seed)
            boot = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(1)
            half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
            effect.update(
                ci_low=float(np.percentile(boot, 2.5)), ci_high=float(np.percentile(boot, 97.5)),
                t_low=float(diffs.mean() - half), t_high=float(diffs.mean() + half),
                t_p=float(stats.ttest_1samp(diffs, 0.0).pvalue),
            )  # fmt: skip
        effects.append(effect)
    return effects


def _present(value: Any) -> bool:
    """Whether a table cell holds a number (not missing, None or NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def how_much_this_supports(n_seeds: int) -> str:
    """What paired comparisons over at most ``n_seeds`` seeds can and cannot support, in numbers."""
    fixed = (
        "one fixed test split and one pretraining run per budget (with recipes tuned on one seed): the "
        "sampling of the test cases and the pretraining's run-to-run variation are not in them"
    )
    if n_seeds < 2:
        return (
            "How much this supports: no comparison has two seeds, so no interval and no test: a "
            "difference from one seed is one draw of the labeled subset, initialisation and data order "
            f"on {fixed} -- a record, not a comparison."
        )
    from scipy import stats

    distinct = math.comb(2 * n_seeds - 1, n_seeds)
    boot, t_half = 1.96 * math.sqrt((n_seeds - 1) / n_seeds), stats.t.ppf(0.975, n_seeds - 1)
    return (
        f"How much this supports: at most {n_seeds} seeds per comparison. A percentile bootstrap over "
        f"{n_seeds} differences has only {distinct} distinct resamples and spans about ±{boot:.2f} "
        f"standard errors (normal approximation) against the t interval's ±{t_half:.2f}: it covers "
        "less than 95% for normal differences, so the t interval (which assumes roughly normal "
        "differences, as does its p) is given beside it. An exact two-sided sign-flip or Wilcoxon test "
        f"cannot go below p = {2 / 2**n_seeds:.4f} with {n_seeds} pairs (2 / 2^n). The intervals cover "
        "the variation over seeds (labeled subset, initialisation, data order; with all labeled cases "
        f"only the last two) on {fixed}. The comparisons are not corrected for multiple testing. Read "
        "the differences as effect estimates, not as general findings."
    )


def strict_json(value: Any) -> str:
    """Indented JSON with every NaN written as null: bare NaN is not JSON (jq, browsers reject it)."""

    def clean(item: Any) -> Any:
        if isinstance(item, float) and math.isnan(item):
            return None
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=2, allow_nan=False)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def arm_summary(rows: list[dict]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (labeled count, arm)."""
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["labeled"], r["arm"])].append(r)
    summary = []
    for (labeled, arm), group in sorted(groups.items()):
        entry: dict[str, Any] = {"labeled": labeled, "arm": arm, "n_seeds": len(group)}
        for key in ("test_dice_1", "test_dice_2", "test_dice_mean", "test_hd95_mean", "best_val_dice",
                    "steps_to_95", "steps_to_scratch_95", "wall_time_s", "ext_test_dice_mean", "steps",
                    "best_step", "total_steps", "total_gflops", "total_wall_s"):  # fmt: skip
            values = [r[key] for r in group if _present(r.get(key))]
            entry[key] = _mean_std(values) if values else (float("nan"), 0.0)
        summary.append(entry)
    return summary


def plot_test_dice(rows: list[dict], arms: list[str], path: Path) -> None:
    """Test mean Dice vs labeled count per arm, mean +- std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = arm_summary(rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for offset, arm in zip(np.linspace(-0.04, 0.04, len(arms)), arms, strict=True):
        points = [s for s in summary if s["arm"] == arm]
        if not points:
            continue
        x = np.array([p["labeled"] for p in points], dtype=float)
        means = [p["test_dice_mean"][0] for p in points]
        stds = np.nan_to_num([p["test_dice_mean"][1] for p in points])  # a single seed has no error bar
        # a small multiplicative offset keeps error bars of the arms apart on the log axis
        ax.errorbar(x * (1 + offset), means, yerr=stds, marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.minorticks_off()  # the log axis would label minor ticks "3x10^0" between the labeled counts
    counts = sorted({r["labeled"] for r in rows})
    ax.set_xticks(counts, labels=[str(count) for count in counts])
    ax.set_xlabel("labeled training cases")
    ax.set_ylabel("test mean Dice (mean ± std over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict], arms: list[str], path: Path) -> None:
    """Validation mean Dice vs fine-tuning step, one panel per labeled count: mean over seeds
    (line) and the seeds' range (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["labeled"] for r in rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.5 * len(counts), 3.8), squeeze=False, sharey=True)
    for ax, labeled in zip(axes[0], counts, strict=True):
        for arm in arms:
            curves = [
                dict(map(tuple, r["curve"])) for r in rows if r["arm"] == arm and r["labeled"] == labeled
            ]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            values = np.array([[c[s] for s in steps] for c in curves])
            (line,) = ax.plot(steps, values.mean(0), marker=".", label=f"{arm} ({len(curves)} seeds)")
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(f"{labeled} labeled cases")
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation mean Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cell(pair: tuple[float, float], digits: int = 3) -> str:
    """A table cell of an ``arm_summary`` (mean, std) pair: "n/a" without a value, no std for 1 seed."""
    mean, std = pair
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def interval(low: float | None, high: float | None, digits: int) -> str:
    """A table cell of a 95% interval, signed: "[-0.010, +0.030]"; "n/a" without one."""
    return "n/a" if low is None or high is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def effects_table(effects: list[dict], with_metric: bool = False) -> list[str]:
    """Markdown rows of ``paired_effects`` results: mean difference, bootstrap and t 95% intervals,
    t-test p, and the seeds on which the first arm did better / equally / worse."""
    lines = [
        ("| metric " if with_metric else "") + "| comparison | labeled | seeds | mean difference | "
        "bootstrap 95% interval | t 95% interval | t-test p | seeds better / equal / worse |",
        "|---" * (9 if with_metric else 8) + "|",
    ]
    for e in effects:
        digits = 0 if e.get("metric", "").startswith("steps") else 4  # step counts: whole steps
        a, b = e["comparison"].split(" - ")
        seeds = str(e["n_seeds"])
        if e.get("not_reached_a") or e.get("not_reached_b"):
            seeds += f" (+{e['not_reached_a']} only {b} reached, +{e['not_reached_b']} only {a})"
        mean = "n/a" if e["mean_diff"] is None else f"{e['mean_diff']:+.{digits}f}"
        p_value = "n/a" if e["t_p"] is None else f"{e['t_p']:.3f}"
        bootstrap, t = (
            interval(e["ci_low"], e["ci_high"], digits),
            interval(e["t_low"], e["t_high"], digits),
        )
        lines.append(
            (f"| {e['metric']} " if with_metric else "")
            + f"| {e['comparison']} | {e['labeled']} | {seeds} | {mean} | {bootstrap} | {t} | {p_value} | "
            f"{e['wins']} / {e['ties']} / {e['losses']} |"
        )
    return lines


def markdown_report(rows: list[dict], pretrained: dict, config: Any, effects: list[dict]) -> str:
    """The short report: setup, arms side by side, paired effect sizes, and what they can support."""
    lines = [
        "# Data-efficiency study: MAE init vs scratch vs scratch at matched steps",
        "",
        f"Model `{config.model}`, batch {config.batch_size}, fine-tuning {config.finetune_steps} steps "
        f"(`scratch_matched`: {config.pretrain_steps + config.finetune_steps} = pretrain "
        f"{config.pretrain_steps} + fine-tune {config.finetune_steps}; matched in optimizer steps, not "
        f"FLOPs), validation every {config.val_every} steps on {rows[0]['val_cases'] if rows else '?'} "
        f"fixed validation cases (best checkpoint), scores on {rows[0]['test_cases'] if rows else '?'} "
        f"fixed test cases (split seed {config.split_seed}).",
    ]
    if pretrained:
        lines.append(
            f"MAE pretraining: {pretrained['steps']} steps on {pretrained['cases']} unlabeled images "
            f"({'test images excluded' if pretrained['test_excluded'] else 'test images included'}), "
            f"{pretrained['wall_time_s']:.0f} s wall-clock, final masked-unit loss "
            f"{pretrained['final_loss']:.4f}. The `mae` arm's wall time below excludes this one-off cost."
        )
    lines += [
        "",
        "## Arms side by side (mean ± std over seeds)",
        "",
        "| labeled | arm | seeds | test Dice 1 | test Dice 2 | test Dice mean | test HD95 mean | "
        "best val Dice | steps to 95% of final val | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in arm_summary(rows):
        lines.append(
            f"| {s['labeled']} | {s['arm']} | {s['n_seeds']} | {cell(s['test_dice_1'])} | "
            f"{cell(s['test_dice_2'])} | {cell(s['test_dice_mean'])} | {cell(s['test_hd95_mean'], 2)} | "
            f"{cell(s['best_val_dice'])} | {cell(s['steps_to_95'], 0)} | {cell(s['wall_time_s'], 0)} |"
        )
    lines += [
        "",
        "## Paired effect sizes on test mean Dice",
        "",
        "Differences are paired by seed (same labeled subset, same test cases).",
        "",
        *effects_table(effects),
        "",
        how_much_this_supports(max((e["n_seeds"] for e in effects), default=0)),
        "",
        "Plots: `test_dice_vs_labeled.png` (test Dice vs labeled count per arm), "
        "`val_dice_vs_step.png` (validation Dice vs fine-tuning step per arm, one panel per labeled count).",
        "",
    ]
    return "\n".join(lines)


def write_outputs(
    rows: list[dict], pretrained: dict, config: Any, arms: list[str], folder: Path,
    comparisons: tuple[tuple[str, str], ...] = COMPARISONS, metrics: tuple[str, ...] = ("test_dice_mean",),
    report: Callable[[list[dict], dict, Any, list[dict]], str] | None = None,
) -> dict[str, Path]:  # fmt: skip
    """results.csv / results.json / effects.json, the two PNG plots and report.md in ``folder``:
    paired effects of ``comparisons`` on each of ``metrics``, the report by ``report`` (default:
    ``markdown_report``)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "table_csv": folder / "results.csv",
        "table_json": folder / "results.json",
        "effects": folder / "effects.json",
        "test_plot": folder / "test_dice_vs_labeled.png",
        "curve_plot": folder / "val_dice_vs_step.png",
        "report": folder / "report.md",
    }
    with open(files["table_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, TABLE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(files["table_json"], strict_json({"pretrain": pretrained, "runs": rows}))
    pairs = [(a, b) for a, b in comparisons if a in arms and b in arms]
    effects = [{**e, "metric": m} for m in metrics for a, b in pairs for e in paired_effects(rows, a, b, m)]
    atomic_write_text(files["effects"], strict_json(effects))
    plot_test_dice(rows, arms, files["test_plot"])
    plot_curves(rows, arms, files["curve_plot"])
    atomic_write_text(files["report"], (report or markdown_report)(rows, pretrained, config, effects))
    return files
