"""The data-efficiency study: does MAE pretraining help nnFormer with few labels, at matched compute?

``study(StudyConfig) -> StudyResult`` pretrains once (labels unused, test images excluded), then for
each labeled count and seed fine-tunes three arms on the same cases:

- ``mae``: from the MAE encoder, ``finetune_steps`` steps;
- ``scratch``: from random init, the same ``finetune_steps`` steps;
- ``scratch_matched``: from random init, ``pretrain_steps + finetune_steps`` steps -- matched in
  optimizer steps (not FLOPs: a sparse MAE step costs less than a dense fine-tuning step), so the
  measured wall-clock of every arm is reported beside it.

Model selection uses the fixed validation split; the numbers come from the separate test split.
Resumable: each arm writes ``result.json`` atomically into its own folder and is skipped on rerun;
an interrupted arm continues from its last checkpoint; the encoder is reused if its file exists.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.cache import CASES_DIR, PLAN_FILE, load_plan
from ..data.io import atomic_write_text
from ..ops.window_groups import Triple
from .finetune import FinetuneConfig, finetune
from .pretrain import PretrainConfig, pretrain
from .splits import make_splits
from .study_report import write_outputs

ARMS = ("mae", "scratch", "scratch_matched")


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
    model_overrides: dict = field(default_factory=dict)  # Python API only (e.g. a tiny model in tests)


@dataclass
class StudyResult:
    """What ``study`` produced: the finished arms' rows, the pretraining record and the written files."""

    rows: list[dict]  # one per finished arm run; see ``study_report.TABLE_FIELDS``
    pretrain: dict  # encoder path, steps, wall time, cases seen
    files: dict[str, Path]  # table_csv, table_json, report, plots
    wall_time_s: float


def parse_labeled(text: str) -> list[int | None]:
    """``"5,10,all"`` -> ``[5, 10, None]`` (None = the whole training pool)."""
    counts: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        counts.append(None if part.lower() == "all" else int(part))
    if not counts:
        raise ValueError("labeled: give at least one count, e.g. 5,10,all")
    return counts


def parse_arms(text: str) -> list[str]:
    """``"mae,scratch"`` -> ``["mae", "scratch"]``, checked against ``ARMS``."""
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise ValueError(f"arms must be a comma list of {ARMS}, got {text!r}")
    return arms


def steps_to_fraction(curve: list[tuple[int, float]], fraction: float = 0.95) -> int | None:
    """First validation step whose Dice reaches ``fraction`` of the curve's final Dice (None if no
    curve): how fast an arm gets near where it ends."""
    if not curve:
        return None
    final = curve[-1][1]
    return next(step for step, dice in curve if dice >= fraction * final)


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


def run_pretraining(config: StudyConfig, out: Path, exclude: set[str], cache: Path) -> dict:
    """Pretrain once, or reuse ``out/pretrain/encoder.safetensors``; returns the pretraining record."""
    folder = out / "pretrain"
    record_path = folder / "pretrain.json"
    encoder = folder / "encoder.safetensors"
    if encoder.is_file() and record_path.is_file():
        return json.loads(record_path.read_text())
    data = pretraining_view(cache, exclude, out / "pretrain_data") if exclude else cache
    started = time.perf_counter()
    result = pretrain(PretrainConfig(
        data=str(data), out=str(folder), model=config.model, crop_size=config.crop_size,
        batch_size=config.batch_size, steps=config.pretrain_steps, num_workers=config.num_workers,
        device=config.device, precision=config.precision, progress=config.progress, resume=True,
        checkpoint_every=max(1, config.pretrain_steps // 4), model_overrides=config.model_overrides,
    ))  # fmt: skip
    record = {
        "encoder_path": str(result.encoder_path),
        "steps": result.steps,
        "wall_time_s": time.perf_counter() - started,
        "final_loss": result.final_loss,
        "cases": len(load_plan(data)["cases"]),
        "test_excluded": bool(exclude),
    }
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return record


def run_arm(config: StudyConfig, folder: Path, arm: str, labeled: int | None, seed: int, cache: Path,
            encoder: str) -> dict:  # fmt: skip
    """Fine-tune one arm (or load its finished result); returns its table row plus the curve."""
    result_path = folder / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    print(f"study: {folder} ...", flush=True)
    steps = config.finetune_steps + (config.pretrain_steps if arm == "scratch_matched" else 0)
    started = time.perf_counter()
    result = finetune(FinetuneConfig(
        data=str(cache), out=str(folder), init=encoder if arm == "mae" else None, model=config.model,
        crop_size=config.crop_size, labeled=labeled, seed=seed, split_seed=config.split_seed,
        val_fraction=config.val_fraction, test_fraction=config.test_fraction, steps=steps,
        batch_size=config.batch_size, val_every=config.val_every, max_val_cases=config.max_val_cases,
        num_workers=config.num_workers, precision=config.precision, device=config.device,
        checkpoint_every=max(1, steps // 4), resume=True, progress=config.progress,
        model_overrides=config.model_overrides,
    ))  # fmt: skip
    row = {
        "arm": arm,
        "labeled": len(result.splits["train"]),
        "seed": seed,
        "steps": steps,
        **{f"test_dice_{k}": v for k, v in (result.test_dice or {}).items()},
        **{f"test_hd95_{k}": v for k, v in (result.test_hd95 or {}).items()},
        "best_val_dice": result.best_val_dice,
        "best_step": result.best_step,
        "steps_to_95": steps_to_fraction(result.curve),
        # The whole call: training, validations and the test scoring (a resumed arm: the last part).
        "wall_time_s": time.perf_counter() - started,
        "curve": [list(point) for point in result.curve],
        "test_cases": len(result.splits["test"]),
        "val_cases": len(result.splits["val"][: config.max_val_cases or None]),
    }
    atomic_write_text(result_path, json.dumps(row, indent=2))
    print(f"study: {arm} labeled={row['labeled']} seed={seed}: test Dice {row.get('test_dice_mean')}, "
          f"{row['wall_time_s']:.0f} s", flush=True)  # fmt: skip
    return row


def study(config: StudyConfig) -> StudyResult:
    """Run (or resume) the whole study and write the table, plots and Markdown report."""
    from ..data import ensure_preprocessed

    started = time.perf_counter()
    out = Path(config.out)
    if config.report_only:
        return finished_study(config, out, started)
    counts, arms = parse_labeled(config.labeled), parse_arms(config.arms)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study_config.json", json.dumps(asdict(config), indent=2, default=str))
    cache = Path(ensure_preprocessed(config.data, config.cache_dir))
    plan = load_plan(cache)
    labeled_cases = [c["id"] for c in plan["cases"] if c["has_label"]]
    splits = make_splits(labeled_cases, config.val_fraction, config.test_fraction, config.split_seed)
    exclude = set(splits.test) if config.exclude_test else set()
    pretrained = run_pretraining(config, out, exclude, cache) if "mae" in arms else {}

    rows = []
    # Seeds outermost: a study stopped early still holds complete, paired (arm x count) seeds.
    for seed in range(config.seeds):
        for labeled in counts:
            name = "all" if labeled is None else str(labeled)
            for arm in arms:
                folder = out / "runs" / f"labeled-{name}" / f"seed-{seed}" / arm
                rows.append(run_arm(config, folder, arm, labeled, seed, cache,
                                    pretrained.get("encoder_path", "")))  # fmt: skip
    files = write_outputs(rows, pretrained, config, arms, Path(config.report_dir or out)) if rows else {}
    return StudyResult(rows, pretrained, files, time.perf_counter() - started)


def finished_study(config: StudyConfig, out: Path, started: float) -> StudyResult:
    """Tables, plots and report from every finished arm under ``out`` (e.g. of a study stopped early,
    or of several study processes run side by side over one ``out``), with the settings it ran with."""
    saved = out / "study_config.json"
    if saved.is_file():  # the run's own settings describe its results; keep only where to write
        fields = {**json.loads(saved.read_text()), "report_dir": config.report_dir, "report_only": True}
        config = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    record = out / "pretrain" / "pretrain.json"
    pretrained = json.loads(record.read_text()) if record.is_file() else {}
    results = sorted(out.glob("runs/labeled-*/seed-*/*/result.json"))
    rows = sorted((json.loads(p.read_text()) for p in results),
                  key=lambda r: (r["seed"], r["labeled"], ARMS.index(r["arm"])))  # fmt: skip
    if not rows:
        raise FileNotFoundError(f"{out}: no finished arms (runs/labeled-*/seed-*/*/result.json)")
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
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
    "report_only": "only rewrite tables, plots and report from the arms finished under OUT (trains nothing)",
}


def cmd_study(args: argparse.Namespace) -> int:
    from ..cli_args import dataclass_from_args

    result = study(dataclass_from_args(StudyConfig, args))
    print(f"study finished in {result.wall_time_s:.0f} s ({len(result.rows)} arm runs)")
    for key, path in result.files.items():
        print(f"{key}: {path}")
    return 0


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
