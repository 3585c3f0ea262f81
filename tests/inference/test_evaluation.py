"""Evaluation against independent references: Dice and HD95 against brute-force distances computed
here, sliding-window stitching against the whole-volume map and a weighted mean worked out here, and
``maeformer predict`` against an oracle model, voxel by voxel in each input's own grid."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from maeformer_fast.inference.metrics import dice, hd95
from maeformer_fast.inference.sliding_window import sliding_window_predict

FACES = [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """(N, 3) voxels of ``mask`` with a face neighbour outside the mask or outside the array."""
    points = []
    for voxel in itertools.product(*map(range, mask.shape)):
        if not mask[voxel]:
            continue
        for step in FACES:
            neighbour = tuple(v + s for v, s in zip(voxel, step))
            inside = all(0 <= n < size for n, size in zip(neighbour, mask.shape))
            if not inside or not mask[neighbour]:
                points.append(voxel)
                break
    return np.array(points, dtype=np.float64)


def brute_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th percentile of both directed surface-distance sets pooled (medpy's and nnFormer's HD95)."""
    surface_a, surface_b = brute_surface(a) * spacing, brute_surface(b) * spacing
    pairwise = np.sqrt(((surface_a[:, None, :] - surface_b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([pairwise.min(1), pairwise.min(0)]), 95))


def random_mask(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """A union of a few random boxes with random voxels flipped: irregular surfaces, holes, specks."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        start = [rng.integers(0, n - 1) for n in shape]
        stop = [rng.integers(s + 1, n + 1) for s, n in zip(start, shape)]
        mask[tuple(slice(s, e) for s, e in zip(start, stop))] = True
    return mask ^ (rng.random(shape) < 0.05)


def test_dice_and_hd95_equal_brute_force_on_random_anisotropic_masks():
    """Catches the larger of the two directed 95th percentiles (MONAI's convention, tried in
    ``hd95``), spacing applied in reverse axis order (tried: ``sampling=spacing[::-1]``), surfaces
    from 26-connected erosion (tried: ``generate_binary_structure(3, 3)``) and a Dice without the
    factor 2 (tried)."""
    rng = np.random.default_rng(0)
    spacing = (0.6, 1.7, 2.9)
    for _ in range(12):
        prediction, reference = random_mask(rng, (9, 11, 8)), random_mask(rng, (9, 11, 8))
        overlap = np.count_nonzero(prediction & reference)
        expected_dice = 2 * overlap / (np.count_nonzero(prediction) + np.count_nonzero(reference))
        assert dice(prediction, reference) == pytest.approx(expected_dice, abs=1e-12)
        expected = brute_hd95(prediction, reference, spacing)
        assert hd95(prediction, reference, spacing) == pytest.approx(expected, abs=1e-9)

    empty, some = np.zeros((5, 6, 7), bool), random_mask(rng, (5, 6, 7))
    assert dice(empty, empty) == 1.0 and hd95(empty, empty, spacing) == 0.0
    for one_empty in ((some, empty), (empty, some)):
        assert dice(*one_empty) == 0.0 and math.isnan(hd95(*one_empty, spacing))


def test_stitched_windows_of_a_pointwise_linear_model_equal_the_whole_volume():
    """A 1x1x1 convolution gives every voxel the same value in every window, so any stitching that
    puts a window's output in the wrong place or mixes weights wrongly shows. Catches a window pasted
    one voxel off (tried: ``slice(z, ...)`` -> ``slice(z + 1, ...)`` in the region, which failed on
    the shape) and starts that miss the volume's end (tried: ``round(i * (size - window) / count)``:
    uncovered voxels become NaN)."""
    torch.manual_seed(0)
    model = nn.Conv3d(2, 3, 1).eval()
    for size in ((21, 26, 15), (21, 7, 15)):  # several windows per axis; y padded in the second
        image = torch.randn(2, *size)
        with torch.no_grad():
            expected = model(image[None]).softmax(1)[0]
        for overlap in (0.5, 0.3):
            stitched = sliding_window_predict(model, image, (8, 10, 6), num_classes=3, overlap=overlap)
            torch.testing.assert_close(stitched, expected, rtol=0, atol=1e-6)


class WindowDependentModel(nn.Module):
    """Logits that depend on the window's corner and the voxel's place in it; the input holds each
    voxel's (z, y, x) position, so the corner is read from the window's first voxel and recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.corners: list[tuple[int, int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corners = x[:, :, 0, 0, 0]  # (B, 3)
        self.corners += [tuple(int(v) for v in c.tolist()) for c in corners]
        return window_logits(corners[:, :, None, None, None], x)


def window_logits(corner: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(B, 3, ...) logits of voxels at ``position`` (B, 3, ...) in windows with ``corner`` (B, 3, ...)."""
    local = position - corner
    key = (corner * torch.tensor([0.7, 1.3, 0.9]).view(1, 3, 1, 1, 1)).sum(1)
    shape = (local * torch.tensor([0.2, -0.1, 0.3]).view(1, 3, 1, 1, 1)).sum(1)
    return torch.stack([torch.zeros_like(shape), torch.cos(key + shape), torch.sin(2 * key - shape)], 1)


def test_each_voxel_is_the_gaussian_weighted_mean_of_the_windows_covering_it():
    """Computed here from the windows the model saw: catches unweighted stitching (tried:
    ``importance`` all ones), weights divided by a count instead of the Gaussian sum (tried:
    ``weight[region] += 1``) and a Gaussian of another width (tried: ``sigma_scale`` 0.25)."""
    size, window = (21, 26, 15), (8, 10, 6)
    position = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
    )
    model = WindowDependentModel()
    stitched = sliding_window_predict(model, position, window, num_classes=3, overlap=0.5, batch_size=3)

    def gaussian(n: int) -> np.ndarray:  # nnU-Net's: sigma = window / 8 per axis, peak at the centre
        offsets = np.arange(n) - (n - 1) / 2
        return np.exp(-0.5 * (offsets / (n / 8)) ** 2)

    weights = gaussian(window[0])[:, None, None] * gaussian(window[1])[None, :, None] * gaussian(window[2])
    total, weight_sum = np.zeros((3, *size)), np.zeros(size)
    assert len(set(model.corners)) == len(model.corners) > 8
    for corner in model.corners:
        region = tuple(slice(c, c + w) for c, w in zip(corner, window))
        assert all(c >= 0 and c + w <= n for c, w, n in zip(corner, window, size))
        logits = window_logits(torch.tensor(corner, dtype=torch.float32).view(1, 3, 1, 1, 1),
                               position[(slice(None), *region)][None])  # fmt: skip
        total[(slice(None), *region)] += logits[0].double().softmax(0).numpy() * weights
        weight_sum[region] += weights
    assert (weight_sum > 0).all(), "every voxel lies in some window"
    np.testing.assert_allclose(stitched.numpy(), total / weight_sum, rtol=0, atol=1e-6)
    sums = stitched.sum(0)
    torch.testing.assert_close(sums, torch.ones_like(sums))


class ThresholdOracle(nn.Module):
    """Class 1 where the last channel of the preprocessed input is above 0, voxel by voxel."""

    def __init__(self, crop: tuple[int, int, int]) -> None:
        super().__init__()
        self.config = SimpleNamespace(crop_size=crop, num_classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        foreground = (x[:, -1:] > 0).float()
        return 10 * torch.cat([1 - foreground, foreground], 1)


# Voxel sizes 3 mm (superior), 1.5 mm (anterior), 1 mm (right) in every case: each input's grid is the
# plan's once reoriented, so nothing is resampled and the answer is exact voxel by voxel.
PLAN_SPACING = [3.0, 1.5, 1.0]  # (z, y, x) of the RAS-reoriented arrays
CASES = {
    # voxel axes -> (posterior 1.5 mm, superior 3 mm, left 1 mm): permuted and flipped, odd sizes
    "permuted": ((11, 7, 9), [[0, 0, -1.0, 20], [-1.5, 0, 0, 8], [0, 3.0, 0, -5]]),
    "ras": ((9, 13, 5), [[1.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 3.0, 0]]),
    "flipped": ((10, 9, 7), [[-1.0, 0, 0, 3], [0, 1.5, 0, -2], [0, 0, -3.0, 1]]),
}


def bright_volume(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Voxels in [1, 2) or (about 40%) in [10, 11), with zero slabs so the nonzero crop cuts something."""
    volume = rng.uniform(1, 2, shape) + 9 * (rng.random(shape) < 0.4)
    volume[:2] = 0
    volume[:, :, -1] = 0
    return volume


def write_model(path: Path, channels: int) -> Path:
    """A tiny real segmenter file carrying the hand-written plan; the test swaps in the oracle."""
    from maeformer_fast.data.cache import PLAN_VERSION
    from maeformer_fast.models import NNFormer, get_config
    from maeformer_fast.models.pretrained import save_segmenter

    plan = {"version": PLAN_VERSION, "spacing": PLAN_SPACING, "channel_names": ["MRI"] * channels,
            "normalization": [{"scheme": "zscore"}] * channels, "num_channels": channels, "num_classes": 2,
            "labels": {"0": "background", "1": "bright"}}  # fmt: skip
    config = get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2), in_channels=channels, num_classes=2)
    return save_segmenter(path, NNFormer(config), plan, {})


@pytest.fixture
def oracle(monkeypatch):
    """``load_segmenter`` reads the file (format, plan) and returns the threshold oracle as its model."""
    from maeformer_fast.models import pretrained

    load = pretrained.load_segmenter

    def load_oracle(path):
        _, plan, info = load(path)
        return ThresholdOracle((8, 8, 8)), plan, info

    monkeypatch.setattr(pretrained, "load_segmenter", load_oracle)


@pytest.mark.parametrize(("mirror", "compiled"), [(False, False), (True, False), (False, True)])
def test_predict_returns_the_oracle_answer_voxel_exact_in_each_source_grid(
    oracle, tmp_path, mirror, compiled
):
    """``maeformer predict`` of a thresholding oracle on non-RAS, anisotropic, odd-sized inputs must
    give back exactly the thresholded input in the input's grid, also through the compiled model
    (``--compile``). Catches a lost crop offset (tried: restoring the cropped box at the origin), an
    inverse reorientation applied the wrong way (tried: ``ornt_transform(ornt, RAS_ORNT)``), mirror
    predictions not flipped back (tried: ``out`` for ``out.flip(dims)``), and the filled-up windows of
    a compiled model's last batch written into the volume (tried: zipping the starts padded with
    the first window's)."""
    from maeformer_fast.cli.main import main
    from maeformer_fast.data import write_nifti
    from maeformer_fast.data.io import read_volume

    rng = np.random.default_rng(1)
    model = write_model(tmp_path / "model.safetensors", channels=1)
    expected = {}
    for name, (shape, rows) in CASES.items():
        volume = bright_volume(rng, shape)
        affine = np.array([*rows, [0, 0, 0, 1]], dtype=np.float64)
        write_nifti(tmp_path / "in" / f"{name}.nii.gz", volume.astype(np.float32), affine)
        expected[name] = ((volume > 5).astype(np.uint8), affine)
    argv = ["predict", "--model", str(model), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
            "--device", "cpu"] + (["--mirror"] if mirror else [])  # fmt: skip
    argv += ["--compile"] if compiled else []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compiler falling back to eager fails the test
        assert main(argv) == 0
    for name, (labels, affine) in expected.items():
        written = read_volume(tmp_path / "out" / f"{name}.nii.gz", kind="label")
        np.testing.assert_array_equal(written.data, labels, err_msg=name)
        np.testing.assert_array_equal(written.affine, affine)


def test_predict_of_a_two_channel_input_reads_the_channels_in_order(oracle, tmp_path):
    """Channel files case_0000 / case_0001: the oracle thresholds the second channel, so channels read
    in another order (tried: each new channel file put first in ``group_channels``) fail."""
    from maeformer_fast.cli.main import main
    from maeformer_fast.data import write_nifti
    from maeformer_fast.data.io import read_volume

    rng = np.random.default_rng(2)
    model = write_model(tmp_path / "model.safetensors", channels=2)
    shape, rows = CASES["permuted"]
    affine = np.array([*rows, [0, 0, 0, 1]], dtype=np.float64)
    first, second = rng.uniform(1, 3, shape), bright_volume(rng, shape)
    write_nifti(tmp_path / "in" / "case_0000.nii.gz", first.astype(np.float32), affine)
    write_nifti(tmp_path / "in" / "case_0001.nii.gz", second.astype(np.float32), affine)
    argv = ["predict", "--model", str(model), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--device", "cpu"]) == 0
    written = read_volume(tmp_path / "out" / "case.nii.gz", kind="label")
    np.testing.assert_array_equal(written.data, (second > 5).astype(np.uint8))


def test_predict_png_outlines_the_prediction_and_scores_the_reference(oracle, tmp_path, monkeypatch):
    """``maeformer predict --png --reference``: one picture per case, drawn from the input read again,
    the label map as written and the case's reference, Dice per class in the title. The oracle's
    answer is known exactly: against itself Dice is 1.000; against a reference with the bright voxels
    of the first half of the volume only, Dice is 2|A∩B| / (|A| + |B|), counted here by hand. A case
    without a reference gets its name alone. Mutations caught: the reference not matched by case name
    (no Dice in the title); the picture drawn from the preprocessed (cropped) labels (shapes differ
    from the input's)."""
    from maeformer_fast.cli.main import main
    from maeformer_fast.data import write_nifti
    from maeformer_fast.inference import predict as predict_module

    drawn = {}

    def capture(path, image, labels, truth, title):
        drawn[path.name] = (image.shape, labels.shape, None if truth is None else truth.shape, title)
        return path

    monkeypatch.setattr(predict_module, "segmentation_png", capture)
    rng = np.random.default_rng(2)
    model = write_model(tmp_path / "model.safetensors", channels=1)
    affine = np.diag([1.0, 1.5, 3.0, 1.0])
    expected_dice = {}
    for name, shape in (("same", (9, 13, 5)), ("half", (10, 9, 7)), ("alone", (8, 8, 8))):
        volume = bright_volume(rng, shape)
        write_nifti(tmp_path / "in" / f"{name}.nii.gz", volume.astype(np.float32), affine)
        labels = (volume > 5).astype(np.uint8)
        if name == "half":
            labels[shape[0] // 2 :] = 0
        if name != "alone":
            write_nifti(tmp_path / "ref" / f"{name}.nii.gz", labels, affine)
        predicted, truth = (volume > 5), labels.astype(bool)
        expected_dice[name] = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    argv = ["predict", "--model", str(model), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--png", "--reference", str(tmp_path / "ref")]  # fmt: skip
    assert main(argv) == 0
    assert drawn["same.png"] == ((9, 13, 5), (9, 13, 5), (9, 13, 5), "same: Dice 1 1.000")
    assert drawn["half.png"][3] == f"half: Dice 1 {expected_dice['half']:.3f}"
    assert drawn["alone.png"] == ((8, 8, 8), (8, 8, 8), None, "alone")
