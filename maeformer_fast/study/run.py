"""``maeformer study``: run (or resume) a study of either protocol, or rewrite its report from the records."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..data.cache import cache_view, load_plan
from ..data.io import atomic_write_text
from ..train.splits import make_splits
from .common import (
    ARMS,
    CONVERGED_ARMS,
    ArmSpec,
    Deadline,
    Stopped,
    StudyConfig,
    StudyResult,
    arm_folder,
    arm_order,
    external_test_set,
    parse_arms,
    parse_labeled,
    run_arm,
    run_pretraining,
)
from .report import write_outputs


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
    data = cache_view(cache, exclude, out / "pretrain_data") if exclude else cache
    external = external_test_set(config, out, plan)
    deadline = Deadline(config.max_hours)
    if config.protocol == "converged":
        from .converged import run_converged

        return run_converged(config, out, cache, data, counts, external, deadline, started)

    arms = parse_arms(config.arms)
    order = arm_order(config.seeds, counts, arms, config.only_arm)
    rows: list[dict] = []
    pretrained: dict = {}
    try:
        if "mae" in arms:
            deadline.check(out / "pretrain" / "pretrain.json")
            pretrained = run_pretraining(config, out / "pretrain", data, config.pretrain_steps,
                                         config.model_overrides, deadline=deadline)  # fmt: skip
        # Seeds outermost: a study stopped early still holds complete, paired (arm x count) seeds.
        for seed, labeled, arm in order:
            folder = arm_folder(out, labeled, seed, arm)
            deadline.check(folder / "result.json")
            steps = config.finetune_steps + (config.pretrain_steps if arm == "scratch_matched" else 0)
            spec = ArmSpec(pretrained.get("encoder_path") if arm == "mae" else None, steps)
            rows.append(run_arm(config, folder, arm, labeled, seed, cache, spec, external, deadline))
    except Stopped as stop:
        print(f"study: stopped: {stop}", flush=True)
    files = write_outputs(rows, pretrained, config, arms, Path(config.report_dir or out)) if rows else {}
    complete = len(rows) == len(order)
    return StudyResult(rows, pretrained, files, time.perf_counter() - started, complete)


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
        from .converged_report import converged_outputs
        from .progress import write_progress

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
