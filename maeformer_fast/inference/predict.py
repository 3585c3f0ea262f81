"""``predict``: NIfTI predictions in the inputs' own geometry; ``evaluate``: Dice/HD95 tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..device import CompiledModel, resolve_compile, resolve_compile_mode, resolve_precision, use_device
from .evaluation import predict_case
from .metrics import dice, hd95, per_class_scores
from .pictures import dice_title, segmentation_png


def nifti_files(path: Path) -> list[Path]:
    """The NIfTI files of a folder (sorted), or the file itself; a clear error when there are none."""
    from ..data.io import is_nifti

    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if is_nifti(p)) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{path}: no .nii or .nii.gz files found")
    return files


def files_by_case(folder: Path) -> dict[str, Path]:
    """Case name (the file name without its NIfTI suffix) -> file, for the NIfTI files of ``folder``."""
    from ..data.io import strip_nifti_suffix

    return {strip_nifti_suffix(p.name): p for p in nifti_files(folder)}


def group_channels(files: list[Path], num_channels: int) -> dict[str, list[Path]]:
    """Case name -> channel files. Multi-channel inputs follow nnU-Net naming (case_0000.nii.gz, ...)."""
    from ..data.io import strip_nifti_suffix

    cases: dict[str, list[Path]] = {}
    for file in files:
        stem = strip_nifti_suffix(file.name)
        if num_channels > 1 and len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            stem = stem[:-5]
        cases.setdefault(stem, []).append(file)
    return cases


def predict(model_path: str | Path, inputs: str | Path, out: str | Path, device: str = "auto",
            precision: str = "auto", overlap: float = 0.5, mirror: bool = False,
            compile: bool | None = None, png: bool = False,
            reference: str | Path | None = None) -> list[Path]:  # fmt: skip
    """Segment every volume under ``inputs`` and write ``<case>.nii.gz`` label maps (uint8) to ``out``,
    in each input's own shape, affine and orientation (preprocessing undone).

    ``model_path``: a model file, or a fine-tuning output folder (its best ``model.safetensors``).
    An unreadable input does not stop the others: every readable one is written, then a DatasetError
    lists the bad ones. ``compile`` (default: the device's, ``runtime.resolve_compile``) runs the
    windows through the compiled model: one graph per window shape, on one GPU replayed as a CUDA
    graph.

    ``png``: also ``out/png/<case>.png`` (:mod:`.pictures`): three slices of the input's first channel
    through the structure, the prediction outlined; with ``reference`` (a folder of label maps named
    like the inputs) the reference outlined too and each class's Dice in the title."""
    from ..data import DatasetError, preprocess_volume, restore_to_original, write_nifti
    from ..models.pretrained import load_segmenter

    torch_device = use_device(device)
    resolved = resolve_precision(precision, torch_device)
    model_path = Path(model_path)
    if model_path.is_dir():
        model_path = model_path / "model.safetensors"
    model, plan, _ = load_segmenter(model_path)
    model.to(torch_device)
    crop, num_classes = model.config.crop_size, model.config.num_classes
    if resolve_compile(compile, torch_device):
        model = CompiledModel(model, mode=resolve_compile_mode("auto", torch_device, distributed=False))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, problems = [], []
    cases = group_channels(nifti_files(Path(inputs)), plan["num_channels"])
    # The reference label maps by case name, listed once (multi-channel inputs: the case, not the file).
    references = {}
    if png and reference is not None:
        references = files_by_case(Path(reference))
    for name, files in tqdm(sorted(cases.items()), desc="predict", unit="case"):
        try:
            image, geometry = preprocess_volume(files if len(files) > 1 else files[0], plan)
        except DatasetError as error:
            problems += error.problems
            continue
        labels = predict_case(model, image, crop, num_classes, torch_device, resolved, overlap,
                              mirror=mirror)  # fmt: skip
        restored, affine = restore_to_original(labels, geometry)
        written.append(write_nifti(out / f"{name}.nii.gz", restored.astype(np.uint8), affine))
        if png:
            case_picture(
                out / "png" / f"{name}.png", name, files[0], restored, references.get(name), num_classes
            )
    if problems:
        raise DatasetError(problems, f"{inputs} (its {len(written)} readable inputs are predicted in {out})")
    return written


def case_picture(
    path: Path, name: str, image_file: Path, labels: np.ndarray, reference: Path | None, num_classes: int
) -> Path:
    """:func:`.pictures.segmentation_png` of case ``name`` in its input's own voxel grid: the image read
    again from ``image_file`` (its first channel), ``labels`` (Z, Y, X) as written, and the label map
    ``reference`` where the case has one (then Dice per class in the title)."""
    from ..data.io import read_volume

    image = read_volume(image_file).data
    image = image[..., 0] if image.ndim == 4 else image  # the first channel of a 4D input
    truth = None if reference is None else read_volume(reference, kind="label").data
    title = name
    if truth is not None:
        title = dice_title(name, {str(c): dice(labels == c, truth == c) for c in range(1, num_classes)})
    return segmentation_png(path, image.astype(np.float32), labels, truth, title)


def evaluate(pred: str | Path, ref: str | Path, out: str | Path | None = None,
             classes: list[int] | None = None) -> dict:  # fmt: skip
    """Dice and HD95 (mm, from the reference's voxel spacing) per class and case.

    Files are matched by name. ``classes``: the foreground labels to score; default every nonzero
    label found in any reference or prediction, so a class predicted where the reference has none
    scores Dice 0 (a false positive) instead of being left out. Writes ``scores.csv`` (one row per case
    and class) and ``scores.json`` (per case and summary: mean, std, count per class) to ``out``
    (default: ``pred``). Empty-mask conventions are those of :mod:`maeformer_fast.inference.metrics`.
    """
    from ..data.io import read_volume

    pred_files, ref_files = files_by_case(Path(pred)), files_by_case(Path(ref))
    missing = sorted(set(ref_files) - set(pred_files))
    if missing:
        raise FileNotFoundError(f"{pred}: no prediction for reference cases {missing[:10]}")
    found: dict[str, dict[int, dict[str, float]]] = {}
    for name in tqdm(sorted(ref_files), desc="evaluate", unit="case"):
        reference = read_volume(ref_files[name], kind="label")
        prediction = read_volume(pred_files[name], kind="label")
        if prediction.data.shape != reference.data.shape:
            raise ValueError(
                f"{pred_files[name]}: shape {prediction.data.shape} differs from the reference "
                f"{ref_files[name]} {reference.data.shape}"
            )
        if not np.allclose(reference.affine, prediction.affine, atol=1e-3):
            raise ValueError(f"{pred_files[name]}: affine differs from the reference {ref_files[name]}")
        predicted, expected = (np.rint(v.data).astype(np.int64) for v in (prediction, reference))
        present = classes or sorted(
            (set(np.unique(predicted).tolist()) | set(np.unique(expected).tolist())) - {0}
        )
        found[name] = per_class_scores(predicted, expected, present, reference.spacing)
    # A class found in other cases but in neither mask of this one scores as two empty masks (no re-read).
    scored = classes or sorted({c for scores in found.values() for c in scores})
    empty = np.zeros(1, dtype=bool)
    both_empty = {"dice": dice(empty, empty), "hd95": hd95(empty, empty, (1.0,))}
    per_case = {name: {str(c): scores.get(c, both_empty) for c in scored} for name, scores in found.items()}
    rows = [
        {"case": name, "class": int(c), **v} for name, scores in per_case.items() for c, v in scores.items()
    ]
    summary = {}
    for c in scored:
        entry = {}
        for metric in ("dice", "hd95"):
            values = [r[metric] for r in rows if r["class"] == c and not math.isnan(r[metric])]
            mean, std = (float(np.mean(values)), float(np.std(values))) if values else (math.nan, math.nan)
            entry[metric] = {"mean": mean, "std": std, "count": len(values)}
        summary[str(c)] = entry
    out = Path(out) if out else Path(pred)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["case", "class", "dice", "hd95"])
        writer.writeheader()
        writer.writerows(rows)
    result = {"cases": per_case, "summary": summary}
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(summary: dict) -> str:
    """The per-class summary of :func:`evaluate` as a text table."""
    lines = [
        f"{'class':>5}  {'Dice mean':>9}  {'Dice std':>8}  {'HD95 mean':>9}  {'HD95 std':>8}  {'n(HD95)':>7}"
    ]
    for c, entry in summary.items():
        d, h = entry["dice"], entry["hd95"]
        lines.append(
            f"{c:>5}  {d['mean']:9.4f}  {d['std']:8.4f}  {h['mean']:9.2f}  {h['std']:8.2f}  {h['count']:7d}"
        )
    return "\n".join(lines)
