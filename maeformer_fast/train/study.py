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

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.cache import CASES_DIR, PLAN_FILE, load_plan
from ..data.io import atomic_write_text
from ..ops.window_groups import Triple
from .finetune import FinetuneConfig, evaluate_saved, finetune
from .pretrain import PretrainConfig, pretrain
from .splits import make_splits
from .study_protocol import loss_flattening, machine, read_loss_curve
from .study_report import write_outputs

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
        counts.append(None if part.lower() == "all" else int(part))
    if not counts:
        raise ValueError("labeled: give at least one count, e.g. 5,10,all")
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


def pretraining_view(cache: Path, exclude: set[str], view: Path) -> Path:
    """A cache folder that lists only the cases not in ``exclude`` and shares the arrays of ``cache``.

    The pretraining API draws from every case of its cache; a filtered plan.json beside a link to the
    original ``cases/`` folder keeps the test images out without copying any array.
    """
    plan = load_plan(cache)
    view.mkdir(parents=True, exist_ok=True)
    link = view / CASES_DIR
    if not link.exists():
        link.symlink_to((cache / CASES_DIR).resolve(), target_is_directory=True)
    plan["cases"] = [c for c in plan["cases"] if c["id"] not in exclude]
    atomic_write_text(view / PLAN_FILE, json.dumps(plan, indent=2))
    return view


def run_pretraining(config: StudyConfig, folder: Path, data: Path, steps: int, overrides: dict,
                    mask_ratio: float = 0.75, deadline: Deadline | None = None) -> dict:  # fmt: skip
    """Pretrain once into ``folder`` on the cache ``data``, or reuse its finished encoder; returns the
    pretraining record (with the loss's flattening over the last tenth of the run, from its log).
    Raises :class:`Stopped` when ``deadline`` passed and the run paused at a checkpoint."""
    record_path = folder / "pretrain.json"
    if (folder / "encoder.safetensors").is_file() and record_path.is_file():
        return json.loads(record_path.read_text())
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
        "encoder_path": str(result.encoder_path),
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
    return record


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
    from ..models.config import get_config
    from .runtime import pick_device, resolve_precision

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
        "model_overrides": config.model_overrides, "evaluate_test": spec.evaluate_test, **spec.recipe,
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


def study(config: StudyConfig) -> StudyResult:
    """Run (or resume) the whole study and write the table, plots and Markdown report."""
    from ..data import ensure_preprocessed

    started = time.perf_counter()
    out = Path(config.out)
    if config.protocol not in ("fixed", "converged"):
        raise ValueError(f"protocol must be fixed or converged, got {config.protocol!r}")
    if config.jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {config.jobs}")
    if config.report_only:
        return finished_study(config, out, started)
    counts = parse_labeled(config.labeled)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study_config.json", json.dumps(asdict(config), indent=2, default=str))
    cache = Path(ensure_preprocessed(config.data, config.cache_dir))
    plan = load_plan(cache)
    labeled_cases = [c["id"] for c in plan["cases"] if c["has_label"]]
    splits = make_splits(labeled_cases, config.val_fraction, config.test_fraction, config.split_seed)
    exclude = set(splits.test) if config.exclude_test else set()
    data = pretraining_view(cache, exclude, out / "pretrain_data") if exclude else cache
    external = external_test_set(config, out, plan)
    deadline = Deadline(config.max_hours)
    if config.protocol == "converged":
        from .study_converged import run_converged

        return run_converged(config, out, cache, data, counts, external, deadline, started)

    arms = parse_arms(config.arms)
    rows: list[dict] = []
    pretrained: dict = {}
    try:
        if "mae" in arms:
            deadline.check(out / "pretrain" / "pretrain.json")
            pretrained = run_pretraining(config, out / "pretrain", data, config.pretrain_steps,
                                         config.model_overrides, deadline=deadline)  # fmt: skip
        # Seeds outermost: a study stopped early still holds complete, paired (arm x count) seeds.
        for seed, labeled, arm in arm_order(config.seeds, counts, arms):
            folder = arm_folder(out, labeled, seed, arm)
            deadline.check(folder / "result.json")
            steps = config.finetune_steps + (config.pretrain_steps if arm == "scratch_matched" else 0)
            spec = ArmSpec(pretrained.get("encoder_path") if arm == "mae" else None, steps)
            rows.append(run_arm(config, folder, arm, labeled, seed, cache, spec, external, deadline))
    except Stopped as stop:
        print(f"study: stopped: {stop}", flush=True)
    files = write_outputs(rows, pretrained, config, arms, Path(config.report_dir or out)) if rows else {}
    complete = len(rows) == config.seeds * len(counts) * len(arms)
    return StudyResult(rows, pretrained, files, time.perf_counter() - started, complete)


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


def arm_order(seeds: int, counts: list[int | None], arms: list[str]) -> list[tuple[int, int | None, str]]:
    """(seed, labeled count, arm) in run order: seeds outermost, so a study stopped early holds
    complete, paired (count x arm) sets for its first seeds."""
    return [(seed, labeled, arm) for seed in range(seeds) for labeled in counts for arm in arms]


def arm_folder(out: Path, labeled: int | None, seed: int, arm: str) -> Path:
    """``OUT/runs/labeled-K/seed-S/ARM`` (K = ``all`` for the whole pool)."""
    return out / "runs" / f"labeled-{'all' if labeled is None else labeled}" / f"seed-{seed}" / arm


def finished_study(config: StudyConfig, out: Path, started: float) -> StudyResult:
    """Tables, plots and report from every finished arm under ``out`` (e.g. of a study stopped early,
    or of several study processes run side by side over one ``out``), with the settings it ran with."""
    saved = out / "study_config.json"
    if saved.is_file():  # the run's own settings describe its results; keep only where to write
        fields = {**json.loads(saved.read_text()), "report_dir": config.report_dir, "report_only": True}
        config = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    order = CONVERGED_ARMS if config.protocol == "converged" else ARMS
    results = sorted(out.glob("runs/labeled-*/seed-*/*/result.json"))
    rows = sorted((json.loads(p.read_text()) for p in results),
                  key=lambda r: (r["seed"], r["labeled"], order.index(r["arm"])))  # fmt: skip
    if config.protocol == "converged":  # progress.md always; the report once an arm is done
        from .study_converged_report import converged_outputs
        from .study_progress import write_progress

        files = write_progress(out, Path(config.report_dir or out))
        pretrained: dict = {}
        if rows:
            rows, pretrained, report_files = converged_outputs(config, out, rows)
            files.update(report_files)
        return StudyResult(rows, pretrained, files, time.perf_counter() - started)
    if not rows:
        raise FileNotFoundError(f"{out}: no finished arms (runs/labeled-*/seed-*/*/result.json)")
    arms = [a for a in order if any(r["arm"] == a for r in rows)]
    record = out / "pretrain" / "pretrain.json"
    pretrained = json.loads(record.read_text()) if record.is_file() else {}
    files = write_outputs(rows, pretrained, config, arms, Path(config.report_dir or out))
    return StudyResult(rows, pretrained, files, time.perf_counter() - started)


STUDY_HELP = {
    "data": "labeled dataset (Decathlon layout) or its preprocessing cache",
    "out": "work folder: pretrain/, runs/labeled-K/seed-S/ARM/ (each with result.json); rerun to resume",
    "report_dir": "where results.csv/json, the PNG plots and report.md go (default: OUT)",
    "labeled": "comma list of labeled training-case counts; 'all' = the whole training pool",
    "seeds": "seeds 0..N-1 per labeled count (each picks its own labeled subset and init)",
    "arms": "comma list of mae (MAE init), scratch (same steps), scratch_matched (pretrain + fine-tune "
    "steps)",
    "model": "model config: small, synapse, acdc, tumor",
    "crop_size": "training crop and sliding window in voxels (default: the model config's crop)",
    "batch_size": "batch size of pretraining and fine-tuning",
    "pretrain_steps": "MAE pretraining steps (run once; scratch_matched adds them to its fine-tuning steps)",
    "finetune_steps": "fine-tuning steps of the mae and scratch arms",
    "val_every": "validate every N steps (picks the best model; gives the Dice-vs-step curves)",
    "max_val_cases": "validate on the first N cases of the fixed validation split (speed)",
    "split_seed": "seed of the fixed test/validation split shared by every arm",
    "val_fraction": "share of labeled cases in the validation split",
    "test_fraction": "share of labeled cases in the test split (scores only, never selection)",
    "exclude_test": "keep the test-split images out of pretraining",
    "num_workers": "data loader worker processes per run",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "precision": "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16",
    "cache_dir": "where to build the preprocessing cache of a raw dataset",
    "progress": "show progress bars",
    "report_only": "only rewrite tables, plots and report from the arms finished under OUT (trains nothing); "
    "converged: also progress.md, the state of every pretraining run, tuning run and arm, finished or not",
    "test_data": "a separate labeled dataset folder (or cache) every arm's selected model is also scored on; "
    "never used for training, selection or preprocessing statistics",
    "max_hours": "stop after this many hours: no new run starts and a run in progress pauses at its next "
    "checkpoint (every <= 500 steps); rerun the command to continue",
    "protocol": "fixed (the fixed steps above) or converged (tuned, plateau-stopped arms, two pretraining "
    "budgets, compute in steps/FLOPs/wall-clock; docs/study.md)",
    "finetune_max_steps": "converged: the MAE arms' maximum fine-tuning steps (scratch adds the pretraining)",
    "plateau_patience": "converged: stop when the last N validations gained no more than --plateau-min-delta",
    "plateau_min_delta": "converged: validation Dice gain that counts as progress",
    "plateau_min_steps": "converged: never stop on a plateau before this step",
    "short_fraction": "converged: the short pretraining budget as a fraction of --pretrain-steps",
    "flatten_tolerance": "converged: the long pretraining has flattened when its mean loss over the last "
    "tenth of the steps is within this relative drop of the tenth before (reported)",
    "encoder_stages": "converged: comma list of encoder stage counts (3 = total stride 8 in the small "
    "config); several are chosen between on validation",
    "mask_ratios": "converged: pretraining mask ratios chosen between on validation",
    "tune_labeled": "converged: labeled count of the tuning runs",
    "tune_seed": "converged: seed of the tuning runs (outside the study's seeds)",
    "tune_lrs": "converged: MAE fine-tuning learning rates tried",
    "tune_warmups": "converged: warmup steps tried (scratch uses the one the MAE search picks)",
    "tune_layer_decays": "converged: layer-wise lr decays tried for the MAE encoder",
    "tune_freeze_steps": "converged: steps the MAE encoder stays frozen, tried",
    "tune_scratch_lrs": "converged: scratch learning rates tried (as many as the MAE recipe search runs)",
    "tune_scratch_warmups": "converged: scratch warmups tried after its learning rate, by the same "
    "coordinate search as MAE's (empty: the warmup the MAE search picks)",
    "tune_scratch_weight_decays": "converged: scratch AdamW weight decays tried after its warmup; the first "
    "is the base (empty: fine-tuning's default)",
    "jobs": "converged: tuning runs that do not depend on each other (the pretexts, one knob's values, "
    "the scratch lrs) trained at once, each in its own process (e.g. one per CPU core, with "
    "OMP_NUM_THREADS=1)",
}


def cmd_study(args: argparse.Namespace) -> int:
    from ..cli_args import dataclass_from_args

    config = dataclass_from_args(StudyConfig, args)
    result = study(config)
    if config.report_only:
        print(f"study report written from {len(result.rows)} finished arm runs")
    else:
        done = "finished" if result.complete else "stopped by --max-hours (rerun to continue)"
        print(f"study {done} in {result.wall_time_s:.0f} s ({len(result.rows)} arm runs)")
    for key, path in result.files.items():
        print(f"{key}: {path}")
    # 75 (EX_TEMPFAIL): stopped by --max-hours, to be rerun; scripts that run it in chunks read this.
    return 0 if config.report_only or result.complete else 75


def add_study_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``maeformer study`` on the ``maeformer`` command's subparsers."""
    from ..cli_args import add_dataclass_arguments

    parser = subparsers.add_parser(
        "study",
        help="data-efficiency study: MAE init vs scratch vs scratch with matched steps, over labeled counts",
        description="Pretrain once on the non-test images (labels unused), then fine-tune per labeled "
        "count and seed from the MAE encoder, from scratch with the same steps, and from scratch with "
        "pretrain + fine-tune steps. Selects on the validation split, scores the test split, and writes "
        "a CSV/JSON table, PNG plots and a Markdown report. Rerun the same command to resume.",
    )
    add_dataclass_arguments(parser, StudyConfig, STUDY_HELP)
    parser.set_defaults(func=cmd_study)
    return parser
