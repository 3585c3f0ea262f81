"""Intensity augmentation (data/augment.py) against closed-form formulas written here in float64 numpy:
brightness, contrast, gamma, Gaussian noise, their order, and the parameters the sampler draws; then the
same formulas through every loader (workers, memory-resident, DALI), which must apply the same values.

The formulas are nnU-Net's (batchgenerators' ``augment_brightness_multiplicative``,
``augment_contrast(preserve_range=True)``, ``augment_gamma(retain_stats=True)``,
``augment_gaussian_noise``), per sample and per channel:

- brightness: ``x * b``;
- contrast: ``clip((x - mean) * c + mean, min, max)`` with the mean, min and max of x before the change;
- gamma: ``t = (x - min) / (max - min)``, ``y = t ** g * (max - min) + min``, then y shifted and scaled
  to x's mean and std (numpy's population std here: the ratio of two stds is the same for any ddof);
- noise: ``x + n``, n ~ N(0, std^2) voxel-wise;
- order: noise, brightness, contrast, gamma.

Tolerance: one absolute bound, ATOL, about 5x the largest float32-vs-float64 error measured on these
inputs (measured values at ATOL); the mutations named in the docstrings move values by 1e-2 or more.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from maeformer_fast.data import AugmentConfig, make_loader
from maeformer_fast.data.augment import apply_intensity
from maeformer_fast.data.batch import augment_batch
from maeformer_fast.data.cache import open_case
from maeformer_fast.data.loaders import make_sampler
from maeformer_fast.data.sampling import BatchPlan, CropSampler

HAS_DALI = (
    importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
)
# Largest |float32 result - float64 formula| measured (|x| <= 8 here, <= 2.6 in the phantom crops):
# brightness 4.8e-7, contrast 3.3e-7, gamma 1.0e-6 (its restored mean 4.8e-7, std 0), all four composed
# 3.9e-6, augment_batch 2.6e-6, through the loaders 1.1e-6.
ATOL = 2e-5
IDENTITY = (1.0, 1.0, 1.0, 0.0)  # (brightness, contrast, gamma, noise std) of an untouched sample


def _images(batch: int, size: int = 12) -> torch.Tensor:
    """(batch, 2, size^3) float32 test volumes: channel 0 standard normal (negative values, minimum far
    from 0), channel 1 skewed and offset (5 + 3 u^2): gamma's min-shift and per-channel statistics both
    matter on these."""
    gen = torch.Generator().manual_seed(1234)
    normal = torch.randn(batch, 1, size, size, size, generator=gen)
    skewed = 5 + 3 * torch.rand(batch, 1, size, size, size, generator=gen) ** 2
    return torch.cat([normal, skewed], dim=1)


def _run(
    image: torch.Tensor, rows: list[tuple[float, float, float, float]], seeds: torch.Tensor | None = None
) -> torch.Tensor:
    """apply_intensity with one (brightness, contrast, gamma, noise std) row per sample."""
    seeds = torch.arange(len(rows), dtype=torch.int64) + 100 if seeds is None else seeds
    return apply_intensity(image, torch.tensor(rows, dtype=torch.float32), seeds)


def _contrast(x: np.ndarray, c: float) -> np.ndarray:
    """nnU-Net's contrast with preserve_range on one channel (float64)."""
    if c == 1:
        return x
    mean = x.mean()
    return np.clip((x - mean) * c + mean, x.min(), x.max())


def _gamma(x: np.ndarray, g: float) -> np.ndarray:
    """nnU-Net's gamma with retain_stats on one channel (float64): min/max rescale, power, rescale back,
    then the mean and std of x restored."""
    if g == 1:
        return x
    lo, span = x.min(), x.max() - x.min()
    y = ((x - lo) / span) ** g * span + lo
    return (y - y.mean()) / y.std() * x.std() + x.mean()


def _formula(x: np.ndarray, params: Sequence[float], noise: np.ndarray | None = None) -> np.ndarray:
    """Noise, brightness, contrast and gamma (in that order) on one sample x (C, Z, Y, X), float64;
    ``params`` = (brightness, contrast, gamma[, noise std])."""
    b, c, g = (float(p) for p in params[:3])
    y = (x.astype(np.float64) + (0 if noise is None else noise)) * b
    return np.stack([_gamma(_contrast(channel, c), g) for channel in y])


def _noise(seed: int, std: float, shape: tuple[int, ...]) -> np.ndarray:
    """The noise a sample with ``seed`` gets, as ``apply_noise`` documents it: std times a standard
    normal draw from a CPU generator seeded with ``seed``."""
    return std * torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double().numpy()


def _assert_formula(out: torch.Tensor, expected: np.ndarray, where: object = "") -> None:
    """|out - expected| <= ATOL everywhere; the message gives the largest error (mutation sizes)."""
    error = float(np.abs(out.double().numpy() - expected).max())
    assert error < ATOL, f"{where}: max |error| {error:.3g} >= {ATOL}"


def test_brightness_multiplies_each_sample_by_its_factor() -> None:
    """Brightness alone: sample b equals x[b] * factor[b] exactly (one float32 multiply); an identity
    sample is returned bit for bit.

    Mutation seen failing: additive brightness (``x + (params[:, 0] - 1)`` for ``x * params[:, 0]``):
    sample 0 no longer equals x * 0.75.
    """
    x = _images(3)
    out = _run(x, [(0.75, 1, 1, 0), (1.25, 1, 1, 0), IDENTITY])
    assert torch.equal(out[0], x[0] * np.float32(0.75)) and torch.equal(out[1], x[1] * np.float32(1.25))
    assert torch.equal(out[2], x[2])


def test_contrast_scales_around_each_channel_mean_and_clips_to_its_old_range() -> None:
    """Contrast alone, against the formula per channel: 1.25 stretches (and the clip to the old
    [min, max] engages: some voxels sit on the old bounds), 0.75 shrinks (nothing to clip); the
    channel means stay where they were; an identity sample is untouched.

    Mutations seen failing (max error against the formula): the clamp dropped (1.0); the mean taken
    over both channels (``dim=(1, 2, 3, 4)``: 0.76); ``+ mean`` dropped (3.0).
    """
    x = _images(3)
    rows = [(1, 1.25, 1, 0), (1, 0.75, 1, 0), IDENTITY]
    out = _run(x, rows)
    for b, row in enumerate(rows):
        _assert_formula(out[b], _formula(x[b].numpy(), row))
    for channel in range(2):  # the clip engaged at both ends of the stretched sample
        stretched, old = out[0, channel], x[0, channel]
        assert int((stretched == old.min()).sum()) > 1 and int((stretched == old.max()).sum()) > 1
    assert torch.equal(out[2], x[2])


@pytest.mark.parametrize("g", [0.7, 0.85, 1.2, 1.5])
def test_gamma_rescales_to_the_unit_range_powers_and_restores_mean_and_std(g: float) -> None:
    """Gamma alone, against nnU-Net's formula (rescale by the channel's min/max, ``t ** g``, rescale
    back, restore the channel's mean and std), at both ends and the middle of the two halves of the
    default range (0.7, 1.5); a second sample without gamma in the same batch is untouched.

    Mutations seen failing (max error against the formula): the inverted exponent ``** (1 / g)``
    (2.7, 1.2, 1.4, 3.1 for the four g); the min-shift dropped (``x / span`` for ``(x - lo) / span``:
    channel 0's negative values clamp to 0; 2.9 to 4.8); the mean/std restore dropped (0.62 to 1.6).
    """
    x = _images(2)
    out = _run(x, [(1, 1, g, 0), IDENTITY])
    _assert_formula(out[0], _formula(x[0].numpy(), (1, 1, g)))
    assert torch.equal(out[1], x[1])
    for channel in range(2):  # the moments really are the input's (to float32 rounding)
        assert abs(float(out[0, channel].mean() - x[0, channel].mean())) < ATOL
        assert abs(float(out[0, channel].std() - x[0, channel].std())) < ATOL


def test_gamma_and_contrast_leave_a_constant_channel_as_it_is() -> None:
    """A constant channel (an all-background crop) has zero range and zero std: the code's 1e-7 floors
    keep it finite and equal to its value, where a bare division would give NaN.

    Mutation seen failing: ``clamp_min(1e-7)`` dropped from the std in the moment restore (NaN).
    """
    x = torch.full((1, 1, 6, 6, 6), 3.0)
    out = _run(x, [(1, 1.2, 0.8, 0)])
    assert torch.equal(out, x)


def test_noise_has_zero_mean_and_the_drawn_std_and_depends_on_the_seed_only() -> None:
    """Noise alone on 32^3 voxels: per sample, the mean of the added noise is 0 and its std is the
    plan's std (the std, not a variance), within 5 standard errors: for N = 32768 i.i.d. N(0, s^2)
    values the sample mean has standard error s / sqrt(N) (5 SE = 0.028 s) and the sample std s /
    sqrt(2N) (5 SE = 0.020 s). The same seed gives the same noise in another batch position; another
    seed other noise; a std of 0 adds nothing.

    Mutation seen failing: the std used as a variance (``float(std[b]) ** 2``: measured std 0.0998 for
    0.316).
    """
    x = _images(4, size=32)[:, :1]
    stds = [math.sqrt(0.1), 0.05, 0.2, 0.0]  # sqrt(0.1): the largest the default noise_var draws
    out = _run(x, [(1, 1, 1, s) for s in stds], seeds=torch.tensor([7, 8, 9, 7]))
    n = x[0].numel()
    for b, s in enumerate(stds[:3]):
        noise = (out[b] - x[b]).double()
        mean, std = float(noise.mean()), float(noise.std())
        assert abs(mean) < 5 * s / math.sqrt(n), (b, mean)
        assert abs(std / s - 1) < 5 / math.sqrt(2 * n), (b, std, s)
    assert torch.equal(out[3], x[3])
    # Seed 7 in position 1 of another batch, next to another sample: the same values bit for bit.
    again = _run(x[[1, 0]], [(1, 1, 1, 0.5), (1, 1, 1, stds[0])], seeds=torch.tensor([5, 7]))
    assert torch.equal(again[1], out[0])
    assert not torch.allclose(out[1] - x[1], (out[0] - x[0]) * (stds[1] / stds[0]))


def test_all_four_compose_in_nnunet_order() -> None:
    """All four transforms on one sample: the result is gamma(contrast((x + n) * b)) per channel, n
    being the noise the sample's seed draws (``_noise``); other samples of the batch keep their own
    subset.

    Mutations seen failing (max error against the formula): brightness before noise
    (``apply_noise(image * b, ...)``: noise not scaled by b; 0.36); gamma before contrast (0.61); the
    inverted gamma exponent (2.2).
    """
    x = _images(3)
    rows = [(1.2, 1.25, 0.75, 0.3), (0.8, 1, 1.4, 0), (1, 0.8, 1, 0.1)]
    seeds = torch.tensor([11, 12, 13])
    out = _run(x, rows, seeds)
    for b, row in enumerate(rows):
        noise = _noise(int(seeds[b]), row[3], tuple(x.shape[1:])) if row[3] else None
        _assert_formula(out[b], _formula(x[b].numpy(), row, noise), b)


def _plan(cases: int, rows: list[tuple[float, float, float, float]], flips: list[list[bool]]) -> BatchPlan:
    """A hand-made BatchPlan (only flips, intensity and noise seeds matter to ``augment_batch``)."""
    return BatchPlan(
        cases=np.arange(cases),
        starts=np.zeros((cases, 3), np.int64),
        flips=np.array(flips, bool),
        intensity=np.array(rows, np.float32),
        noise_seeds=np.arange(cases, dtype=np.int64) + 40,
        foreground=np.zeros(cases, bool),
    )


@pytest.mark.parametrize("done", ["none", "flips", "flips+brightness"])
def test_augment_batch_applies_what_is_not_done_yet(done: str) -> None:
    """``augment_batch`` on a plan with flips and all four transforms gives the formula on the
    un-augmented crop whatever ran before it: "none" flips image and label itself; "flips" gets the
    crop flipped already (resident gather); "flips+brightness" gets it flipped and multiplied by the
    plan's brightness (DALI pipeline) and must not multiply again. Noise is off in that last case:
    see test_dali_adds_noise_before_brightness_like_the_torch_loader.

    Mutation seen failing: the brightness reset for "flips+brightness" dropped (``intensity[:, 0] =
    1.0`` in ``augment_batch``: brightness applied twice; max error 1.9).
    """
    x = _images(2)
    label = torch.arange(2 * 12**3, dtype=torch.int64).view(2, 12, 12, 12)
    noise_std = (0.0, 0.0) if done == "flips+brightness" else (0.2, 0.1)
    rows = [(1.2, 0.8, 1.3, noise_std[0]), (0.9, 1.2, 0.8, noise_std[1])]
    plan = _plan(2, rows, [[True, False, True], [False, True, False]])
    flipped = torch.stack([x[b].flip([1 + a for a in range(3) if plan.flips[b, a]]) for b in range(2)])
    given = {
        "none": x,
        "flips": flipped,
        "flips+brightness": flipped * torch.tensor([1.2, 0.9]).view(-1, 1, 1, 1, 1),
    }
    out, out_label = augment_batch(given[done], label, plan, done)
    for b, row in enumerate(rows):
        noise = _noise(int(plan.noise_seeds[b]), row[3], tuple(x.shape[1:])) if row[3] else None
        _assert_formula(out[b], _formula(flipped[b].numpy(), row, noise), b)
        axes = [a for a in range(3) if plan.flips[b, a]] if done == "none" else []
        assert torch.equal(out_label[b], label[b].flip(axes) if axes else label[b])


def test_sampler_draws_nnunet_parameter_distributions() -> None:
    """The (brightness, contrast, gamma, noise std) the sampler draws over 8192 samples: each transform
    on with its probability (within 5 standard errors of a binomial share, <= 0.026), brightness and
    contrast in [0.75, 1.25], gamma in [0.7, 1.5] split half below / half above 1, the noise variance
    (std squared) uniform on [0, 0.1] (mean 0.05 within 5 SE = 5 * 0.1 / sqrt(12 n_on)), all identity
    with ``augment=False``.

    Mutations seen failing: the std drawn as the variance itself (``rng.uniform(*cfg.noise_var)``
    without the square root: mean variance 0.0033); gamma always drawn above 1 (share below 1: 0).
    """
    # No cache is read: unlabeled samples are never centred on foreground.
    common = {"labeled": False, "seed": 3, "rank": 0, "foreground_oversample": 0.0}
    sampler = CropSampler("unused", ["a"], [(8, 8, 8)], (8, 8, 8), 256, augment=True, **common)
    p = np.concatenate([sampler.plan(step).intensity for step in range(32)]).astype(np.float64)
    n = len(p)
    cfg = AugmentConfig()
    on = [p[:, 0] != 1, p[:, 1] != 1, p[:, 2] != 1, p[:, 3] != 0]
    for share, prob in zip(on, (cfg.brightness_prob, cfg.contrast_prob, cfg.gamma_prob, cfg.noise_prob)):
        assert abs(share.mean() - prob) < 5 * math.sqrt(prob * (1 - prob) / n)
    for k in (0, 1):
        assert p[on[k], k].min() >= 0.75 and p[on[k], k].max() <= 1.25
    gamma = p[on[2], 2]
    assert gamma.min() >= 0.7 and gamma.max() <= 1.5
    assert abs((gamma < 1).mean() - 0.5) < 5 * math.sqrt(0.25 / len(gamma))
    variance = p[on[3], 3] ** 2
    assert variance.max() <= 0.1 + 1e-6
    assert abs(variance.mean() - 0.05) < 5 * 0.1 / math.sqrt(12 * len(variance))
    plain = CropSampler("unused", ["a"], [(8, 8, 8)], (8, 8, 8), 64, augment=False, **common)
    assert np.array_equal(plain.plan(0).intensity, np.tile(np.float32(IDENTITY), (64, 1)))


# --- the same values through the loaders -------------------------------------------------------------

CROP = (24, 64, 20)  # taller than the phantoms (40x56x48): every crop is zero-padded along y
# Every transform frequent: each batch mixes samples with and without each one.
EVERY = AugmentConfig(noise_prob=0.7, brightness_prob=0.7, contrast_prob=0.5, gamma_prob=0.7)
NO_NOISE = AugmentConfig(noise_prob=0.0, brightness_prob=0.7, contrast_prob=0.5, gamma_prob=0.7)


def _source_crops(cache: Path, sampler: CropSampler, plan: BatchPlan) -> np.ndarray:
    """The plan's crops read independently of the loaders: pad the whole cached volume, slice, then
    flip as the plan says. (B, C, *crop) float32."""
    crops = []
    for case, start, flips in zip(plan.cases, plan.starts, plan.flips, strict=True):
        image = np.asarray(open_case(cache, sampler.case_ids[case], False)[0])
        pad = [(max(0, -s), max(0, s + c - n)) for s, c, n in zip(start, CROP, image.shape[1:], strict=True)]
        padded = np.pad(image, [(0, 0), *pad])
        window = tuple(slice(s + p[0], s + p[0] + c) for s, p, c in zip(start, pad, CROP, strict=True))
        crop = padded[(slice(None), *window)]
        axes = [1 + a for a in range(3) if flips[a]]
        crops.append(np.flip(crop, axes) if axes else crop)
    return np.stack(crops)


def _check_loader_values(cache: Path, config: AugmentConfig, **kwargs) -> None:
    """Three steps of a loader, every sample against the formula on its independently read crop."""
    batches = make_loader(cache, CROP, 6, seed=21, augment_config=config, foreground_oversample=0.5, **kwargs)
    sampler = make_sampler(cache, CROP, 6, seed=21, augment_config=config, foreground_oversample=0.5)
    on = np.zeros(4, int)  # samples that got brightness, contrast, gamma, noise
    for step in range(3):
        batch, plan = next(batches), sampler.plan(step)
        source = _source_crops(cache, sampler, plan)
        for b, row in enumerate(plan.intensity):
            noise = _noise(int(plan.noise_seeds[b]), float(row[3]), source.shape[1:]) if row[3] else None
            _assert_formula(batch["image"][b], _formula(source[b], row, noise), (step, b))
        on += (plan.intensity != np.float32(IDENTITY)).sum(0)
    probs = (config.brightness_prob, config.contrast_prob, config.gamma_prob, config.noise_prob)
    assert all(n >= 3 for n, p in zip(on, probs) if p > 0), on  # each transform enabled was exercised


@pytest.mark.parametrize("placement", ["off", "on"], ids=["workers", "resident"])
def test_torch_loaders_apply_the_formulas(phantom_cache: Path, placement: str) -> None:
    """The worker loader and the memory-resident loader (flips in the gather, intensity on the device)
    give, for every sample of 3 steps, the formula applied to the plan's crop read independently from
    the cache, with the plan's flips and the noise of the plan's seed.

    Mutations seen failing (max error against the formula): the inverted gamma exponent (both
    loaders; 0.30); the resident loader flipping a second time (``done="none"`` for ``"flips"`` in
    ``resident_batches``: flips undone; 2.9).
    """
    _check_loader_values(phantom_cache, EVERY, num_workers=0, data_on_device=placement)


@pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali not installed (pip install -e .[dali])")
def test_dali_loader_applies_the_formulas(phantom_cache: Path) -> None:
    """The DALI loader (CPU pipeline: crop, flips and brightness in DALI; contrast and gamma by the
    torch code) gives the formula on every sample; noise off, see the next test.

    Mutations seen failing (max error against the formula): the inverted gamma exponent (0.88);
    brightness left in the plan after the pipeline applied it (``intensity[:, 0] = 1.0`` dropped in
    ``augment_batch``: brightness squared; 0.35).
    """
    _check_loader_values(phantom_cache, NO_NOISE, backend="dali", num_workers=1)


@pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali not installed (pip install -e .[dali])")
def test_dali_adds_noise_before_brightness_like_the_torch_loader(phantom_cache: Path) -> None:
    """With noise and brightness on the same samples the DALI loader must give the formula's
    (x + n) * b, as the worker and resident loaders do (nnU-Net's order; dali.py promises the same
    batches as the torch backend for a seed).

    Mutation seen failing: ``intensity[:, 3] *= intensity[:, 0]`` dropped in ``batch.augment_batch``
    (the bug this found: DALI gave x * b + n, differences up to 0.24 at b = 1.23, std 0.31, exactly
    n * (b - 1)).
    """
    _check_loader_values(phantom_cache, EVERY, backend="dali", num_workers=1)
