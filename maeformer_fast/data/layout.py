"""Finding the cases of a dataset folder: Decathlon / nnU-Net layout or a plain folder of volumes.

Only file names and ``dataset.json`` are read here; voxel checks live in ``validate.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Problem
from .io import NIFTI_SUFFIXES, is_nifti, strip_nifti_suffix

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    ``images`` holds one file per channel (nnU-Net ``_0000``/``_0001`` files, or a single 3D file), or a
    single 4D file whose last axis holds the channels (``four_d``). ``split`` is ``"train"`` for cases of
    the ``training`` list / ``imagesTr``, ``"test"`` for ``imagesTs`` / the ``test`` list (unlabeled) and
    ``"unlabeled"`` for plain folders.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    split: str
    four_d: bool = False


@dataclass
class DatasetLayout:
    """What a dataset folder holds, before any voxel is read."""

    root: Path
    name: str
    kind: str  # "decathlon" or "folder"
    channel_names: list[str]
    labels: dict[int, str] | None
    cases: list[CaseFiles] = field(default_factory=list)
    readme: Path | None = None


def scan_layout(src: str | Path) -> tuple[DatasetLayout | None, list[Problem]]:
    """Find the cases of ``src`` and every layout problem.

    Layout problems: missing folder, empty folder, unparsable ``dataset.json``, files named in it that
    do not exist, a label without an image and an image without a label. Returns the layout of the good
    cases (None when nothing usable was found) and the problems.
    """
    root = Path(src)
    if root.is_file():
        return None, [Problem(str(root), f"a file, not a dataset folder (pass its folder, {root.parent})")]
    if not root.is_dir():
        return None, [Problem(str(root), "dataset folder does not exist")]
    if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return _scan_decathlon(root)
    return _scan_folder(root)


def _scan_folder(root: Path) -> tuple[DatasetLayout | None, list[Problem]]:
    files = sorted(p for p in root.iterdir() if p.is_file() and is_nifti(p))
    if not files:
        return None, [Problem(str(root), "empty folder: no .nii/.nii.gz volumes found")]
    cases = [CaseFiles(strip_nifti_suffix(p.name), (p,), None, "unlabeled") for p in files]
    layout = DatasetLayout(root, root.name, "folder", ["unknown"], None, cases, _readme(root))
    return layout, []


def _scan_decathlon(root: Path) -> tuple[DatasetLayout | None, list[Problem]]:
    problems: list[Problem] = []
    meta: dict = {}
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("top level is not an object")
        except ValueError as exc:
            return None, [Problem(str(meta_path), f"invalid dataset.json ({exc})")]
    ending = meta.get("file_ending")  # nnU-Net v2: the one image format of the dataset
    if isinstance(ending, str) and not ending.endswith(NIFTI_SUFFIXES):
        message = (
            f"file_ending {ending!r}: maeformer reads NIfTI (.nii, .nii.gz) images only; convert them, or "
            "preprocess the dataset with nnUNetv2_plan_and_preprocess and pass its 3d configuration folder"
        )
        return None, [Problem(str(meta_path), message)]
    channel_names = _channel_names(meta)
    labels = _labels(meta)
    n_channels = len(channel_names)
    cases: list[CaseFiles] = []
    seen_images: set[Path] = set()
    seen_labels: set[Path] = set()

    def resolve(rel: str) -> Path:
        return (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)

    def find_images(image_path: Path) -> tuple[tuple[Path, ...], bool] | None:
        # Decathlon names the (possibly 4D) file itself; nnU-Net names the case and stores _XXXX files.
        if image_path.is_file():
            return (image_path,), n_channels > 1
        stem = strip_nifti_suffix(image_path.name)
        suffix = image_path.name[len(stem) :] or ".nii.gz"
        parts = tuple(image_path.parent / f"{stem}_{c:04d}{suffix}" for c in range(n_channels))
        if all(p.is_file() for p in parts):
            return parts, False
        return None

    listed = "training" in meta or "test" in meta
    for entry in meta.get("training", []) or []:
        img_rel = entry.get("image") if isinstance(entry, dict) else None
        lab_rel = entry.get("label") if isinstance(entry, dict) else None
        if not img_rel or not lab_rel:
            problems.append(Problem(str(meta_path), f"training entry {entry!r} lacks 'image' or 'label'"))
            continue
        img_path, lab_path = resolve(img_rel), resolve(lab_rel)
        found = find_images(img_path)
        seen_images.add(img_path)
        seen_labels.add(lab_path)
        if found is None:
            what = "image" if lab_path.is_file() else "image and label"
            problems.append(Problem(str(img_path), f"dataset.json names a missing file ({what} not found)"))
            if lab_path.is_file():
                problems.append(Problem(str(lab_path), "label without image"))
            continue
        if not lab_path.is_file():
            problems.append(Problem(str(lab_path), "dataset.json names a missing file (image without label)"))
            continue
        seen_images.update(found[0])
        case_id = strip_nifti_suffix(img_path.name)
        cases.append(CaseFiles(case_id, found[0], lab_path, "train", found[1]))
    for entry in meta.get("test", []) or []:
        img_rel = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(img_rel, str):
            problems.append(Problem(str(meta_path), f"test entry {entry!r} is not a file name"))
            continue
        img_path = resolve(img_rel)
        seen_images.add(img_path)
        found = find_images(img_path)
        if found is None:
            problems.append(Problem(str(img_path), "dataset.json names a missing file (image not found)"))
            continue
        seen_images.update(found[0])
        cases.append(CaseFiles(strip_nifti_suffix(img_path.name), found[0], None, "test", found[1]))

    # Files on disk that dataset.json does not mention (or everything, for nnU-Net v2 without lists).
    disk_cases = {
        split: _group_channel_files(root / folder)
        for split, folder in (("train", "imagesTr"), ("test", "imagesTs"))
    }
    label_files = {strip_nifti_suffix(p.name): p for p in _nifti_files(root / "labelsTr")}
    known_ids = {c.case_id for c in cases}
    for split, groups in disk_cases.items():
        for case_id, files in groups.items():
            if any(f.resolve() in seen_images for f in files):
                continue
            if listed and case_id in known_ids:
                continue
            label = label_files.get(case_id) if split == "train" else None
            if split == "train" and label is None:
                if listed:
                    continue  # an unlisted extra image next to a complete list: not ours to judge
                problems.append(Problem(str(files[0]), "image without label (no labelsTr file)"))
                continue
            four_d = n_channels > 1 and len(files) == 1
            cases.append(CaseFiles(case_id, tuple(files), label, split, four_d))
            known_ids.add(case_id)
            if label is not None:
                seen_labels.add(label.resolve())
    for case_id, lab in label_files.items():
        if lab.resolve() not in seen_labels and case_id not in known_ids:
            problems.append(Problem(str(lab), "label without image"))
    if not cases and not problems:
        problems.append(Problem(str(root), "empty folder: no cases in dataset.json, imagesTr or imagesTs"))
    layout = DatasetLayout(
        root, str(meta.get("name") or root.name), "decathlon", channel_names, labels, cases, _readme(root)
    )
    return (layout if cases else None), problems


def _group_channel_files(folder: Path) -> dict[str, list[Path]]:
    """Case id -> its image files in ``folder`` (``_XXXX`` channel files grouped, sorted by channel)."""
    groups: dict[str, list[Path]] = {}
    for p in _nifti_files(folder):
        stem = strip_nifti_suffix(p.name)
        # nnU-Net names channel files case_XXXX; a 4-digit suffix is read as a channel index.
        m = _CHANNEL_SUFFIX.match(stem)
        groups.setdefault(m.group("case") if m else stem, []).append(p)
    return {k: sorted(v) for k, v in groups.items()}


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _channel_names(meta: dict) -> list[str]:
    # Decathlon: "modality": {"0": "FLAIR", ...}; nnU-Net v2: "channel_names": {"0": "CT"}.
    mapping = meta.get("modality") or meta.get("channel_names") or {"0": "unknown"}
    if not isinstance(mapping, dict):
        return ["unknown"]
    return [str(mapping[k]) for k in sorted(mapping, key=lambda k: int(k))]


def _labels(meta: dict) -> dict[int, str] | None:
    # Decathlon: {"0": "background", "1": "x"}; nnU-Net v2: {"background": 0, "x": 1}.
    mapping = meta.get("labels")
    if not isinstance(mapping, dict) or not mapping:
        return None
    out: dict[int, str] = {}
    for k, v in mapping.items():
        if str(k).lstrip("-").isdigit():
            out[int(k)] = str(v)
        elif isinstance(v, int):
            out[v] = str(k)
    return dict(sorted(out.items())) or None


def _readme(root: Path) -> Path | None:
    for name in ("README.md", "README.txt", "README", "LICENSE", "LICENCE"):
        if (root / name).is_file():
            return root / name
    return None
