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
    "test_hd95_2", "test_hd95_mean", "best_val_dice", "best_step", "steps_to_95", "wall_time_s",
    "ext_test_dice_1", "ext_test_dice_2", "ext_test_dice_mean", "max_steps", "pretrain_steps", "total_steps",
    "total_gflops", "total_wall_s", "machine",
]  # fmt: skip
COMPARISONS = (("mae", "scratch"), ("mae", "scratch_matched"))


def paired_effects(rows: list[dict], a: str, b: str, metric: str = "test_dice_mean",
                   resamples: int = 10000, seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Per labeled count: mean of the paired differences ``a - b`` over seeds run by both arms, a
    percentile bootstrap 95% interval of that mean, and the paired t-test p-value (two-sided)."""
    from scipy import stats

    by_key = {(r["arm"], r["labeled"], r["seed"]): r[metric] for r in rows if metric in r}
    effects = []
    for labeled in sorted({r["labeled"] for r in rows}):
        seeds = sorted(s for (arm, k, s) in by_key if arm == a and k == labeled and (b, k, s) in by_key)
        if not seeds:
            continue
        diffs = np.array([by_key[(a, labeled, s)] - by_key[(b, labeled, s)] for s in seeds])
        rng = np.random.default_rng(seed)
        boot = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(1)
        p_value = float(stats.ttest_rel(
            [by_key[(a, labeled, s)] for s in seeds], [by_key[(b, labeled, s)] for s in seeds]
        ).pvalue) if len(seeds) > 1 and diffs.std() > 0 else float("nan")  # fmt: skip
        effects.append({
            "comparison": f"{a} - {b}", "labeled": labeled, "n_seeds": len(seeds),
            "mean_diff": float(diffs.mean()), "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)), "t_p": p_value,
            "wins": int((diffs > 0).sum()),
        })  # fmt: skip
    return effects


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
                    "steps_to_95", "wall_time_s", "ext_test_dice_mean", "steps", "best_step", "total_steps",
                    "total_gflops", "total_wall_s"):  # fmt: skip
            values = [r[key] for r in group if r.get(key) is not None and not math.isnan(r[key])]
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
    ax.set_xticks(sorted({r["labeled"] for r in rows}), labels=map(str, sorted({r["labeled"] for r in rows})))
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


def _fmt(pair: tuple[float, float], digits: int = 3) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "n/a"
    return (
        f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    )  # 1 seed: no std


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
            f"| {s['labeled']} | {s['arm']} | {s['n_seeds']} | {_fmt(s['test_dice_1'])} | "
            f"{_fmt(s['test_dice_2'])} | {_fmt(s['test_dice_mean'])} | {_fmt(s['test_hd95_mean'], 2)} | "
            f"{_fmt(s['best_val_dice'])} | {_fmt(s['steps_to_95'], 0)} | {_fmt(s['wall_time_s'], 0)} |"
        )
    lines += [
        "",
        "## Paired effect sizes on test mean Dice",
        "",
        "Differences are paired by seed (same labeled subset, same test cases). Interval: percentile "
        "bootstrap of the mean difference over seeds; p: paired t-test, two-sided.",
        "",
        "| comparison | labeled | seeds | mean difference | bootstrap 95% interval | paired t p "
        "| seeds won |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in effects:
        lines.append(
            f"| {e['comparison']} | {e['labeled']} | {e['n_seeds']} | {e['mean_diff']:+.4f} | "
            f"[{e['ci_low']:+.4f}, {e['ci_high']:+.4f}] | {e['t_p']:.3f} | {e['wins']}/{e['n_seeds']} |"
        )
    n_seeds = max((e["n_seeds"] for e in effects), default=0)
    lines += [
        "",
        f"How much this supports: with at most {n_seeds} seeds per comparison a bootstrap over seeds can "
        f"only resample those few differences, so its interval understates the uncertainty; the paired "
        f"t-test has at most {max(n_seeds - 1, 0)} degrees of freedom, and an exact two-sided Wilcoxon "
        f"signed-rank test cannot go below p = {2 / 2 ** max(n_seeds, 1):.3f} with {n_seeds} pairs "
        f"(2 / 2^n). "
        f"Read the differences as effect estimates over seeds (labeled subset + init), not as general "
        f"findings; seed-to-seed spread is shown as ± std.",
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
    atomic_write_text(files["table_json"], json.dumps({"pretrain": pretrained, "runs": rows}, indent=2))
    pairs = [(a, b) for a, b in comparisons if a in arms and b in arms]
    effects = [{**e, "metric": m} for m in metrics for a, b in pairs for e in paired_effects(rows, a, b, m)]
    atomic_write_text(files["effects"], json.dumps(effects, indent=2))
    plot_test_dice(rows, arms, files["test_plot"])
    plot_curves(rows, arms, files["curve_plot"])
    atomic_write_text(files["report"], (report or markdown_report)(rows, pretrained, config, effects))
    return files
