"""The converged study protocol: plateau criterion, FLOP-matched budgets, bootstrap intervals, and the
whole ``--protocol converged`` command at tiny scale (tuning, two pretraining budgets, plateau-stopped
arms, ``--test-data``, ``--max-hours`` chunks resumed by arm)."""

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from maeformer_fast.bench.flops import step_flops
from maeformer_fast.data import ensure_preprocessed, make_phantoms
from maeformer_fast.models import get_config
from maeformer_fast.models.nnformer import NNFormer
from maeformer_fast.models.pretrained import load_segmenter
from maeformer_fast.study import common as study_module
from maeformer_fast.study import converged as study_converged
from maeformer_fast.study.common import StudyConfig
from maeformer_fast.study.converged_report import dice_summary_table, with_compute, with_convergence
from maeformer_fast.study.protocol import matched_steps, scratch_max_steps
from maeformer_fast.study.report import arm_summary, how_much_this_supports, paired_effects, strict_json
from maeformer_fast.study.run import study
from maeformer_fast.train.finetune import FinetuneConfig, finetune

from .test_study import recomputed_test_dice


def curve(*dice: float, every: int = 100) -> list[tuple[int, float]]:
    return [(every * (i + 1), d) for i, d in enumerate(dice)]


def seed_rows(metric: str, values: dict[str, list], labeled: int = 2) -> list[dict]:
    """Study rows of ``metric`` per arm, the i-th value of each arm at seed i."""
    return [
        {"arm": arm, "labeled": labeled, "seed": seed, metric: value}
        for arm, arm_values in values.items()
        for seed, value in enumerate(arm_values)
    ]


def test_flop_matched_budget_arithmetic():
    """Catches scratch's maximum taken in the cheaper currency (tried: ``min`` for ``max`` in
    ``scratch_max_steps``: 1,120 steps, cutting scratch short) and a FLOP budget priced with the wrong
    step (tried: ``with_compute`` charging pretraining steps at the fine-tuning step's FLOPs)."""
    # 400 sparse pretraining steps at 3 GFLOPs = 120 fine-tuning steps at 10 GFLOPs: steps give more.
    assert scratch_max_steps(1000, 400, 3 * 10**9, 10 * 10**9) == 1000 + 400
    # A pretraining step dearer than a fine-tuning step: 400 x 30 / 10 = 1,200 fine-tuning steps.
    assert scratch_max_steps(1000, 400, 30 * 10**9, 10 * 10**9) == 1000 + 1200
    assert scratch_max_steps(1000, 1, 25, 10) == 1000 + 3  # part of a step is a whole step more
    assert matched_steps(55 * 10**9, 10 * 10**9) == 5
    # MAE: 400 pretraining steps (2 GFLOPs, 100 s) + 300 fine-tuning steps (10 GFLOPs, 10 s):
    # 700 steps, 800 + 3000 = 3800 GFLOPs = 380 fine-tuning steps' worth, 110 s.
    flops = {"pretrain_step": 2 * 10**9, "finetune_step": 10 * 10**9}
    pretrained = {"mae": {"steps": 400, "wall_time_s": 100.0}}
    scratch_curve = [(100, 0.5), (380, 0.7), (700, 0.8), (900, 0.9)]
    rows = [
        {"arm": "mae", "labeled": 2, "seed": 0, "steps": 300, "wall_time_s": 10.0, "curve": []},
        {
            "arm": "scratch",
            "labeled": 2,
            "seed": 0,
            "steps": 900,
            "wall_time_s": 30.0,
            "curve": scratch_curve,
        },
    ]
    mae, scratch = with_compute(rows, pretrained, flops)
    assert (mae["total_steps"], mae["total_gflops"], mae["total_wall_s"]) == (700, 3800.0, 110.0)
    assert (scratch["total_steps"], scratch["total_gflops"], scratch["total_wall_s"]) == (900, 9000.0, 30.0)
    assert (scratch["scratch_budget_mae_steps"], scratch["scratch_budget_mae_flops"]) == (700, 380)
    assert scratch["scratch_val_within_mae_steps"] == 0.8
    assert scratch["scratch_val_within_mae_flops"] == 0.7


def test_flop_budget_of_an_exact_number_of_steps_is_not_rounded_away():
    """Catches the FLOP budget priced through float GFLOPs (tried: ``matched_steps(total_gflops * 1e9,
    ...)`` with ``math.floor``: 5,269 steps). A pretraining step costing a tenth of a fine-tuning step
    of 1,649,976,180 FLOPs: 400 of them + 5,230 fine-tuning steps = exactly 5,270 fine-tuning steps."""
    flops = {"pretrain_step": 164_997_618, "finetune_step": 1_649_976_180}
    rows = [
        {"arm": "mae", "labeled": 2, "seed": 0, "steps": 5230, "wall_time_s": 1.0, "curve": []},
        {"arm": "scratch", "labeled": 2, "seed": 0, "steps": 9000, "wall_time_s": 1.0, "curve": []},
    ]
    _, scratch = with_compute(rows, {"mae": {"steps": 400, "wall_time_s": 1.0}}, flops)
    assert scratch["scratch_budget_mae_flops"] == 5270


def test_convergence_is_measured_against_the_best_and_scratchs_best():
    """Catches steps to 95% taken against the plateau's mean (tried: the mean of the last three
    validations as the target: scratch, peaking at 0.80 and sliding to 0.60, then "converges" at step
    100) and a common target from another seed's scratch arm (tried: keying scratch by labeled count
    only: seed 0's MAE then gets seed 1's target and reaches it at step 100)."""
    rows = [
        {"arm": "scratch", "labeled": 2, "seed": 0, "best_val_dice": 0.80,
         "curve": curve(0.60, 0.70, 0.80, 0.65, 0.60, 0.60)},
        {"arm": "mae", "labeled": 2, "seed": 0, "best_val_dice": 0.90,
         "curve": curve(0.70, 0.77, 0.86, 0.90)},
        {"arm": "scratch", "labeled": 2, "seed": 1, "best_val_dice": 0.70, "curve": curve(0.50, 0.70)},
        {"arm": "mae", "labeled": 2, "seed": 1, "best_val_dice": 0.75, "curve": curve(0.60, 0.75)},
        {"arm": "mae", "labeled": 4, "seed": 0, "best_val_dice": 0.90, "curve": curve(0.90)},
    ]  # fmt: skip
    scratch0, mae0, scratch1, mae1, alone = with_convergence(rows)
    assert scratch0["steps_to_95"] == 300  # 0.95 * 0.80 = 0.76: only the peak at step 300 reaches it
    assert (mae0["steps_to_95"], mae0["steps_to_scratch_95"]) == (300, 200)  # 0.855; 0.76
    assert (scratch1["steps_to_95"], mae1["steps_to_scratch_95"]) == (200, 200)  # 0.665 (seed 1's own)
    assert alone["steps_to_scratch_95"] is None  # no scratch arm for that seed yet


def test_counted_step_flops_follow_the_visible_share():
    """Catches a FLOP count that ignores the mask ratio (tried: ``random_unit_mask(..., 0.0)`` in
    ``step_flops``, every unit visible): the sparse step must cost less the more it masks, and less
    than a dense fine-tuning step."""
    tiny = {"embed_dim": 8, "num_heads": (1, 1, 2), "depths": (1, 1, 1), "window_sizes": ((4, 4, 4),) * 3}
    args = ("small", tiny, (32, 48, 32), 1, 1, 3)
    sparse_75, sparse_50 = step_flops(*args, mask_ratio=0.75), step_flops(*args, mask_ratio=0.5)
    finetune = step_flops(*args, mask_ratio=None)
    assert 0 < sparse_75 < sparse_50 < finetune


def test_bootstrap_interval_against_hand_worked_and_enumerated_cases():
    """Catches an unpaired bootstrap (tried: resampling the two arms' seeds independently) and a
    90% interval (tried: percentiles 5 and 95): with 3 seeds the exact 95% percentile interval is
    [min, max] of the differences (each extreme has bootstrap probability 1/27 > 2.5%), and with 5
    seeds the Monte Carlo interval matches the one from all 5^5 resamples."""
    a, b = [0.80, 0.85, 0.70], [0.79, 0.80, 0.72]  # differences +0.01, +0.05, -0.02
    (effect,) = paired_effects(seed_rows("test_dice_mean", {"mae": a, "scratch": b}), "mae", "scratch")
    assert effect["mean_diff"] == pytest.approx(0.04 / 3)
    assert (effect["ci_low"], effect["ci_high"]) == pytest.approx((-0.02, 0.05))
    # t interval: mean +- t(0.975, 2 df) * s / sqrt(3); s = sqrt(0.0024667 / 2) by hand, t = 4.3027 (table)
    half = 4.3027 * np.sqrt(
        ((0.01 - 0.04 / 3) ** 2 + (0.05 - 0.04 / 3) ** 2 + (0.02 + 0.04 / 3) ** 2) / 2 / 3
    )
    assert (effect["t_low"], effect["t_high"]) == pytest.approx((0.04 / 3 - half, 0.04 / 3 + half), abs=1e-5)

    diffs = np.array([0.03, -0.01, 0.08, 0.02, 0.00])
    rows = seed_rows("test_dice_mean", {"mae": list(0.7 + diffs), "scratch": [0.7] * 5}, labeled=4)
    (effect,) = paired_effects(rows, "mae", "scratch")
    means = [diffs[list(i)].mean() for i in itertools.product(range(5), repeat=5)]
    exact = np.percentile(means, [2.5, 97.5], method="inverted_cdf")
    assert (effect["ci_low"], effect["ci_high"]) == pytest.approx(tuple(exact), abs=0.004)


def test_paired_effects_of_one_seed_and_of_step_counts():
    """Catches an interval claimed from one difference (tried: bootstrapping a single seed: [d, d])
    and fewer steps counted as worse (tried: ignoring ``LOWER_IS_BETTER``: 1 seed better, 2 worse)."""
    rows = seed_rows("test_dice_mean", {"mae": [0.8], "scratch": [0.7]}, labeled=1)
    (effect,) = paired_effects(rows, "mae", "scratch")
    assert effect["mean_diff"] == pytest.approx(0.1) and effect["n_seeds"] == 1
    assert [effect[k] for k in ("ci_low", "ci_high", "t_low", "t_high", "t_p")] == [None] * 5
    steps = {"mae": [300, 400, 500, 900], "scratch": [400, 600, 500, 600]}  # mae: -100, -200, 0, +300
    (effect,) = paired_effects(seed_rows("steps_to_95", steps), "mae", "scratch", "steps_to_95")
    assert (effect["wins"], effect["ties"], effect["losses"]) == (2, 1, 1)


def test_paired_steps_count_a_target_never_reached_as_a_loss():
    """Catches a seed where an arm never reached the target dropped from the count (tried: treating
    None as a missing value: better / equal / worse 1 / 0 / 1) and intervals of zero width from
    differences that do not vary (tried: no spread check: [+100, +100])."""
    steps = {"mae": [300, None, 500], "scratch": [400, 600, 400]}  # mae: -100, never, +100
    rows = seed_rows("steps_to_scratch_95", steps)
    (effect,) = paired_effects(rows, "mae", "scratch", "steps_to_scratch_95")
    assert (effect["wins"], effect["ties"], effect["losses"]) == (1, 0, 2)
    assert (effect["n_seeds"], effect["not_reached_a"], effect["not_reached_b"]) == (2, 1, 0)
    assert effect["mean_diff"] == 0.0  # over the two seeds both reached
    rows = seed_rows("steps_to_95", {"mae": [500, 500], "scratch": [400, 400]})
    (effect,) = paired_effects(rows, "mae", "scratch", "steps_to_95")
    assert effect["mean_diff"] == 100 and [effect[k] for k in ("ci_low", "t_low", "t_p")] == [None] * 3


def test_dice_summary_table_against_hand_worked_numbers():
    """Catches the bootstrap interval in place of the t interval (tried: ``ci_low``/``ci_high``:
    [+0.100, +0.200]), a difference put under another comparison's column (tried: iterating
    ``COMPARISONS`` reversed) and a missing arm not shown as such (tried: dropping absent cells, which
    shifts the row). By hand, 2 seeds: mae 0.80 / 0.90, mae_short 0.75 / 0.80, scratch 0.70 / 0.70;
    mae - scratch differences 0.10, 0.20: mean 0.15, s = 0.0707, s / sqrt(2) = 0.05, t(0.975, 1) =
    12.706 (table), interval 0.15 -+ 0.635; the other two differences 0.05, 0.10: 0.075 -+ 0.318."""
    dice = {"mae": [0.80, 0.90], "mae_short": [0.75, 0.80], "scratch": [0.70, 0.70]}
    rows = seed_rows("test_dice_mean", dice)
    rows += seed_rows("test_dice_mean", {"mae": [0.83], "scratch": [0.80]}, labeled=16)
    comparisons = [("mae", "scratch"), ("mae_short", "scratch"), ("mae", "mae_short")]
    effects = [{**e, "metric": "test_dice_mean"} for a, b in comparisons for e in paired_effects(rows, a, b)]
    header, rule, two, sixteen = dice_summary_table(arm_summary(rows), effects)
    assert header == (
        "| labeled | mae | mae_short | scratch | mae - scratch | mae_short - scratch | mae - mae_short |"
    )
    assert rule == "|---" * 7 + "|"
    assert two == (
        "| 2 | 0.850 ± 0.071 | 0.775 ± 0.035 | 0.700 ± 0.000 | +0.150 [-0.485, +0.785] (2 of 2) | "
        "+0.075 [-0.243, +0.393] (2 of 2) | +0.075 [-0.243, +0.393] (2 of 2) |"
    )
    assert sixteen == "| 16 | 0.830 | n/a | 0.800 | +0.030 (1 of 1) | n/a | n/a |"


def test_what_five_seeds_support_in_numbers_and_strict_json():
    """Catches a wrong count of distinct bootstrap resamples (tried: ``comb(2n, n)``: 252), the
    bootstrap's width without the plug-in variance's sqrt((n-1)/n) (tried: 1.96), the t quantile of
    n instead of n - 1 degrees of freedom (tried: 2.57) and NaN written into JSON (tried: no cleaning:
    ValueError). Reference numbers by hand: C(9, 5) = 126 multisets of 5 seeds; 1.96 * sqrt(4/5) =
    1.753; t(0.975, 4) = 2.776 (table); 2 / 2^5 = 0.0625."""
    text = how_much_this_supports(5)
    for number in ("126 distinct", "±1.75 ", "±2.78", "p = 0.0625"):
        assert number in text, number
    assert json.loads(strict_json({"hd95": [float("nan"), 1.5]})) == {"hd95": [None, 1.5]}


def test_finetune_stop_rule_and_encoder_freezing(phantom_cache, tmp_path):
    """Catches a frozen encoder that still trains (tried: the ``requires_grad_`` line in ``finetune``
    removed), a stop rule that is not obeyed (tried: the ``break`` after ``stop(curve)`` removed) and
    a run that stopped at a checkpoint step training on when it is resumed, as an interrupted study
    resumes it (tried: the ``stopped`` check in ``finetune`` removed: the curve gains step 4)."""
    tiny = {"embed_dim": 8, "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)}
    config = FinetuneConfig(
        data=str(phantom_cache), out=str(tmp_path / "ft"), labeled=2, steps=4, val_every=1, max_val_cases=1,
        num_workers=0, progress=False, evaluate_test=False, freeze_encoder_steps=3, model_overrides=tiny,
        val_fraction=0.1, test_fraction=0.1, checkpoint_every=3,
    )  # fmt: skip
    result = finetune(config, stop=lambda curve: curve[-1][0] >= 3)
    assert [step for step, _ in result.curve] == [1, 2, 3]
    again = finetune(replace(config, resume=True), stop=lambda curve: curve[-1][0] >= 3)
    assert again.curve == result.curve and again.best_step == result.best_step
    trained = load_segmenter(result.last_path)[0].state_dict()
    torch.manual_seed(config.seed)  # the initial weights, as finetune draws them
    start = NNFormer(get_config("small", in_channels=1, num_classes=3, **tiny)).state_dict()
    encoder = [k for k in start if k.startswith("encoder.")]
    others = [k for k in start if not k.startswith("encoder.") and start[k].is_floating_point()]
    assert all(torch.equal(trained[k], start[k]) for k in encoder)
    assert not all(torch.equal(trained[k], start[k]) for k in others)


def test_scoring_refuses_a_best_model_file_of_another_step(tmp_path):
    """The test split scores ``model.safetensors`` only if it is the model of the recorded best step
    (a resumed run whose interrupted part saved a later best it did not reach again would otherwise
    be scored with the wrong weights). Mutation caught: the step check in ``evaluate_saved`` removed
    (it then goes on to score, and fails on the empty plan instead: KeyError)."""
    from maeformer_fast.models.pretrained import save_segmenter
    from maeformer_fast.train.finetune import evaluate_saved

    model = NNFormer(get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2)))
    path = save_segmenter(tmp_path / "model.safetensors", model, {"spacing": [1, 1, 1]}, {"step": 500})
    with pytest.raises(RuntimeError, match="holds the model of step 500, not the best validation step 300"):
        evaluate_saved(
            path, tmp_path / "no-cache", ["case"], (32, 32, 32), {}, torch.device("cpu"), "fp32", step=300
        )


@pytest.fixture
def one_thread():
    """The study's scoring and the test's recomputation sum in one fixed order: with several threads
    on a loaded machine the reduction order can change between the two, and the near-tied logits of
    a barely trained model then flip voxels (seen once in a full-suite run: Dice 0.0528 vs 0.0563)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_converged_study_chunks_resume_and_external_test(phantom_cache, tmp_path, capsys, monkeypatch):
    """Catches an arm retrained after a chunk boundary (tried: ``run_arm`` ignoring a finished
    ``result.json``), a run in progress that does not pause at the deadline (tried: ``run_arm`` not
    passing it to ``finetune``: the scratch arm finishes in the first chunk), an external score from
    the wrong model or cases (tried: ``score_external`` scoring ``last.safetensors``, and the training
    cache's cases of the same ids) and scratch capped at the MAE arms' maximum (tried:
    ``scratch_max = config.finetune_max_steps``)."""
    external = ensure_preprocessed(
        make_phantoms(tmp_path / "Elsewhere", num_labeled=2, num_unlabeled=0, shape=(40, 56, 48), seed=7),
        tmp_path / "elsewhere_cache",
    )
    config = StudyConfig(
        data=str(phantom_cache), out=str(tmp_path / "study"), protocol="converged", labeled="1", seeds=1,
        pretrain_steps=4, short_fraction=0.5, finetune_max_steps=3, val_every=1, max_val_cases=1,
        plateau_patience=1, plateau_min_delta=1.0, plateau_min_steps=2, num_workers=0, val_fraction=0.1,
        test_fraction=0.1, encoder_stages="3", mask_ratios="0.6,0.75", tune_labeled=1, tune_lrs="1e-3",
        tune_warmups="1", tune_layer_decays="1.0", tune_freeze_steps="0,1", tune_scratch_lrs="1e-3,2e-3",
        test_data=str(external), max_hours=1.0, model_overrides={"embed_dim": 8},
    )  # fmt: skip
    # A chunk boundary while the third arm trains (after 3 pretrainings, 6 tuning runs and 2 arms): it
    # pauses at its first checkpoint (every step here), unfinished, and the next chunk resumes it.
    scratch = tmp_path / "study" / "runs" / "labeled-1" / "seed-0" / "scratch"
    monkeypatch.setattr(
        study_module.Deadline, "passed", lambda self: (scratch / "finetune_log.csv").is_file()
    )
    first = study(config)
    assert not first.complete and [r["arm"] for r in first.rows] == ["mae", "mae_short"]
    # no scratch arm yet: no target to converge to (tried: counting against every seed: "n/a (0/1)")
    assert "| n/a (no scratch arm yet) |" in first.files["report"].read_text()
    assert (scratch / "checkpoints" / "step-0000001").is_dir() and not (scratch / "result.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    result = study(config)
    printed = capsys.readouterr().out
    assert result.complete and [r["arm"] for r in result.rows] == ["mae", "mae_short", "scratch"]
    assert printed.count(" ...\n") == 1 and "seed-0/scratch ..." in printed  # only the cut arm ran
    # the MAE arms' records are kept; only their convergence against scratch's best is new
    assert [{**r, "steps_to_scratch_95": None} for r in result.rows[:2]] == first.rows

    out = tmp_path / "study"
    choices = json.loads((out / "choices.json").read_text())
    assert choices["mask_units"] == 96 and choices["short_steps"] == 2
    assert choices["scratch_max_steps"] == 3 + 4  # MAE maximum + pretraining steps (cheaper in FLOPs)
    trials = json.loads((out / "tuning.json").read_text())
    assert [t["stage"] for t in trials] == ["pretext"] * 2 + ["mae_recipe"] * 2 + ["scratch_lr"] * 2
    for trial in out.glob("tuning/*/finetune_config.json"):
        assert json.loads(trial.read_text())["lr_schedule"] == "constant", trial
    for row in result.rows:  # plateau (any gain <= 1.0) at step 2, the earliest the rule allows
        assert row["steps"] == 2 and row["max_steps"] == (7 if row["arm"] == "scratch" else 3)
        folder = out / "runs" / "labeled-1" / "seed-0" / row["arm"]
        # every arm at its peak lr after the warmup, whatever its maximum (tried: scratch's recipe
        # without lr_schedule: its run decays over 7 steps)
        assert json.loads((folder / "finetune_config.json").read_text())["lr_schedule"] == "constant"
        cases = ["phantom_000", "phantom_001"]
        assert row["ext_test_cases"] == 2
        assert row["ext_test_dice_mean"] == pytest.approx(
            recomputed_test_dice(folder, external, cases), abs=1e-9
        )
    assert result.rows[0]["pretrain_steps"] == 4 and result.rows[1]["pretrain_steps"] == 2
    for name in ("report", "pretrain_plot", "record", "effects"):
        assert result.files[name].is_file()
    report = result.files["report"].read_text()
    assert "mae_short - scratch" in report and "ext_test_dice_mean" in report
    assert "How much this supports: no comparison has two seeds" in report  # (tried: the paragraph left out)
    # strict JSON: no NaN where a one-seed comparison has no interval (tried: NaN for a missing p)
    json.loads(result.files["effects"].read_text(), parse_constant=pytest.fail)


@pytest.mark.usefixtures("one_thread")
def test_tuning_runs_in_parallel_give_the_sequential_choices(phantom_cache, tmp_path, monkeypatch):
    """``jobs=2``: the two pretexts, the two learning rates and the two scratch lrs each train in worker
    processes, and every tuning record and choice equals the one-at-a-time study's. Mutation caught:
    ``run_in_parallel`` never called (no run goes to the pool)."""
    common = dict(
        data=str(phantom_cache), protocol="converged", labeled="1", seeds=1, pretrain_steps=4,
        short_fraction=0.5, finetune_max_steps=2, val_every=1, max_val_cases=1, plateau_patience=1,
        plateau_min_delta=1.0, plateau_min_steps=2, num_workers=0, val_fraction=0.1, test_fraction=0.1,
        encoder_stages="3", mask_ratios="0.6,0.75", tune_labeled=1, tune_lrs="1e-3,2e-3", tune_warmups="1",
        tune_layer_decays="1.0", tune_freeze_steps="0", tune_scratch_lrs="1e-3,2e-3",
        model_overrides={"embed_dim": 8},
    )  # fmt: skip
    study(StudyConfig(out=str(tmp_path / "one"), **common))
    pooled = []

    class CountingPool(study_converged.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            pooled.append(args[1].name)  # run_arm(config, folder, ...)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(study_converged, "ProcessPoolExecutor", CountingPool)
    study(StudyConfig(out=str(tmp_path / "two"), jobs=2, **common))

    def records(name: str) -> list[dict]:
        trials = json.loads((tmp_path / name / "tuning.json").read_text())
        return [{k: v for k, v in t.items() if k != "wall_time_s"} for t in trials]

    assert records("two") == records("one")
    assert pooled == [t["name"] for t in records("two")]  # all six, in their order
    assert [t["stage"] for t in records("two")] == ["pretext"] * 2 + ["mae_recipe"] * 2 + ["scratch_lr"] * 2
    choices = [json.loads((tmp_path / n / "choices.json").read_text()) for n in ("one", "two")]
    assert choices[0] == choices[1]


@pytest.mark.usefixtures("one_thread")
def test_tuning_runs_in_workers_pause_at_the_deadline(phantom_cache, tmp_path, capsys):
    """With ``jobs=2`` the deadline reaches the worker processes. Three tuning runs, a deadline 2 s after
    the start (before any worker has imported torch): the first (400 steps) pauses at its first
    checkpoint (step 100), unfinished; the second fails at once (an unknown lr schedule); the third
    never starts; the failure is said once and raised, not hidden behind the pause's ``Stopped``.
    Mutations caught: ``trial_args`` without the deadline (the first run trains its 400 steps); a
    pause reported as a failure (said twice); ``Stopped`` raised before the failure."""
    config = StudyConfig(data=str(phantom_cache), out=str(tmp_path), jobs=2, num_workers=0, val_every=100,
                         max_val_cases=1, tune_labeled=1, model_overrides={"embed_dim": 8})  # fmt: skip
    deadline = study_module.Deadline(2 / 3600)
    run = study_converged.Converged(config, tmp_path, phantom_cache, phantom_cache, None, deadline)
    recipe = {"lr_schedule": "constant", "lr": 1e-3, "warmup_steps": 1, "model_overrides": {"embed_dim": 8}}
    good = study_module.ArmSpec(None, 400, recipe, evaluate_test=False)
    bad = replace(good, recipe={**recipe, "lr_schedule": "bogus"})
    trials = [study_converged.Trial("scratch_lr", name, spec, {})
              for name, spec in (("paused", good), ("failed", bad), ("never", good))]  # fmt: skip
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        run.run_trials(trials)
    assert capsys.readouterr().out.count("a tuning run failed") == 1
    paused = tmp_path / "tuning" / "paused"
    assert not (paused / "result.json").exists()
    assert [p.name for p in sorted((paused / "checkpoints").glob("step-*"))] == ["step-0000100"]
    assert not (tmp_path / "tuning" / "never").exists()


def test_a_half_written_log_row_is_left_out(tmp_path):
    """A run killed (or a log read) while a row is being appended leaves a last line without its
    newline, here the elapsed time cut from 4.5 to 4: readers take the complete rows only, and a run
    resumed at step 3 rewrites its log without it. Mutation caught: ``complete_rows`` keeping the last
    line (step 3 with the cut time read and kept)."""
    from maeformer_fast.train.runtime import CsvLog, complete_rows

    header = "step,loss,lr,val_dice,elapsed_s\r\n"
    log = tmp_path / "finetune_log.csv"
    log.write_text(header + "1,2.0,0,,1.0\r\n2,1.5,0,0.3000,2.0\r\n3,1.2,0,,4")
    assert [row["step"] for row in complete_rows(log)] == ["1", "2"]
    CsvLog(log, header.strip().split(","), resume_step=3)
    assert log.read_bytes() == (header + "1,2.0,0,,1.0\r\n2,1.5,0,0.3000,2.0\r\n").encode()


def write_csv(path, header: str, *rows: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def test_progress_report_of_finished_and_running_runs(tmp_path):
    """``--report-only`` before any arm has finished writes progress.md from the runs' own records:
    finished runs from their result/pretrain records, runs in progress from their logs (best
    validation Dice over the logged ones, not the last; steps and clock of the last logged row), the
    finished tuning runs in the order the search ran them. Hand-made records, numbers read off them.
    Arms in progress listed by labeled count as a number (``all`` last), then seed. Mutations caught:
    an in-progress run's best taken as its last validation (0.25 at step 4, not 0.3 at step 2); the
    tuning runs sorted by name only (the running ``a_scratch`` listed first); arms sorted by folder name
    (labeled-10 before labeled-2)."""
    out = tmp_path / "study"
    (out / "pretrain" / "long").mkdir(parents=True)
    (out / "pretrain" / "long" / "pretrain.json").write_text(
        json.dumps({"steps": 10, "wall_time_s": 5.0, "final_loss": 0.5})
    )
    write_csv(out / "pretrain" / "long" / "pretrain_log.csv", "step,loss,lr,voxels_per_s,elapsed_s",
              "5,0.7,0,0,2.5", "10,0.5,0,0,5.0")  # fmt: skip
    (out / "pretrain" / "short").mkdir()
    (out / "pretrain" / "short" / "pretrain_config.json").write_text(json.dumps({"steps": 20}))
    write_csv(out / "pretrain" / "short" / "pretrain_log.csv", "step,loss,lr,voxels_per_s,elapsed_s",
              "5,0.9,0,0,1.0", "10,0.8,0,0,2.0")  # fmt: skip
    finished = {"steps": 30, "max_steps": 40, "wall_time_s": 12.0, "best_val_dice": 0.6, "best_step": 20,
                "curve": [[10, 0.5], [20, 0.6], [30, 0.55]]}  # fmt: skip
    (out / "tuning" / "t_mae").mkdir(parents=True)
    (out / "tuning" / "t_mae" / "result.json").write_text(json.dumps(finished))
    (out / "tuning.json").write_text(json.dumps([{"name": "t_mae"}]))
    (out / "tuning" / "a_scratch").mkdir()
    (out / "tuning" / "a_scratch" / "finetune_config.json").write_text(json.dumps({"steps": 50}))
    write_csv(out / "tuning" / "a_scratch" / "finetune_log.csv", "step,loss,lr,val_dice,elapsed_s",
              "1,2.0,0,,1.0", "2,1.5,0,0.3000,2.0", "3,1.2,0,,3.0", "4,1.1,0,0.2500,4.5")  # fmt: skip

    arms = out / "runs"
    for arm in ("labeled-all/seed-0/mae", "labeled-10/seed-0/mae", "labeled-2/seed-1/scratch"):
        (arms / arm).mkdir(parents=True)
        (arms / arm / "finetune_config.json").write_text(json.dumps({"steps": 80}))
        write_csv(arms / arm / "finetune_log.csv", "step,loss,lr,val_dice,elapsed_s", "1,2.0,0,0.1000,1.0")

    result = study(StudyConfig(data="unused", out=str(out), protocol="converged", report_only=True,
                               report_dir=str(tmp_path / "report")))  # fmt: skip

    assert result.rows == []
    text = result.files["progress"].read_text()
    assert "| long | finished | 10 | 10 | 0.5000 | 5 |" in text
    assert "| short | in progress | 10 | 20 | 0.8000 | 2 |" in text
    tuning = [line for line in text.splitlines() if line.startswith(("| t_mae", "| a_scratch"))]
    assert tuning == [
        "| t_mae | finished | 30 | 40 | 0.6000 | 20 | n/a | 12 |",
        "| a_scratch | in progress | 4 | 50 | 0.3000 | 2 | 1.1000 | 4 |",
    ]
    assert "## Arms (0 finished, 3 in progress)" in text
    arm_rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| labeled-")]
    assert arm_rows == ["| labeled-2/seed-1/scratch", "| labeled-10/seed-0/mae", "| labeled-all/seed-0/mae"]
    assert "None fixed yet" in text
    assert result.files["tuning_plot"].stat().st_size > 0


def test_scratch_coordinate_search_on_hand_made_scores():
    """The scratch search: learning rates at the MAE warmup (the old runs' names, so they are not run
    again), then warmups at the best lr, then weight decays at the best of both; a recipe already run
    is not run twice. Validation Dice made up per run name; the best recipe worked out by hand.
    Mutations caught: the later knobs searched at the base lr instead of the best so far (lr 2e-2's
    runs never appear); the base warmup's run of the warmup knob run again (three warmup runs)."""
    from types import SimpleNamespace

    scores = {
        "scratch_lr-0.005": 0.79, "scratch_lr-0.01": 0.80, "scratch_lr-0.02": 0.78,
        "scratch_lr-0.01_wu-100": 0.81,
        "scratch_lr-0.01_wu-100_wd-0.05": 0.805,
    }  # fmt: skip
    ran: list[list[str]] = []

    def run_trials(batch):
        ran.append([t.name for t in batch])
        return [scores[t.name] for t in batch]

    config = StudyConfig(data="d", out="o", tune_scratch_lrs="5e-3,1e-2,2e-2",
                         tune_scratch_warmups="1000,100", tune_scratch_weight_decays="0.01,0.05")  # fmt: skip
    run = SimpleNamespace(config=config, stop=None, run_trials=run_trials)
    best = study_converged.tune_scratch(run, 9000, {"num_stages": 3}, warmup=1000)
    assert ran == [
        ["scratch_lr-0.005", "scratch_lr-0.01", "scratch_lr-0.02"],
        ["scratch_lr-0.01_wu-100"],
        ["scratch_lr-0.01_wu-100_wd-0.05"],
    ]
    assert best == {"lr_schedule": "constant", "lr": 0.01, "warmup_steps": 100, "weight_decay": 0.01}
