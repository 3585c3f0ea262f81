"""Deterministic choice of training crops, shared by the torch and DALI loaders.

Every random choice of sample ``i`` of step ``step`` on rank ``rank`` comes from one generator seeded
by ``(seed, rank, step, i)``: the batch of a step never depends on what ran before, which is what makes
a resumed run (``start_step=N``) see exactly the batches an uninterrupted run saw, and gives every rank
its own samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import cached_array


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentations (nnU-Net's defaults for these transforms)."""

    flip_prob: float = 0.5  # per axis
    noise_prob: float = 0.1
    noise_var: tuple[float, float] = (0.0, 0.1)
    brightness_prob: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    contrast_prob: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    gamma_prob: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)


@dataclass
class BatchPlan:
    """What to load for one step: B samples.

    ``cases``: (B,) indices into the case list; ``starts``: (B, 3) int64 crop starts (z, y, x), negative
    or past the end where the crop sticks out of the volume (that part is zero-padded); ``flips``: (B, 3)
    bool per axis (z, y, x); ``intensity``: (B, 4) float32 (brightness factor, contrast factor, gamma,
    noise std), identity values (1, 1, 1, 0) where not applied; ``noise_seeds``: (B,) int64;
    ``foreground``: (B,) bool, True where the crop was centred on a foreground voxel.
    """

    cases: np.ndarray
    starts: np.ndarray
    flips: np.ndarray
    intensity: np.ndarray
    noise_seeds: np.ndarray
    foreground: np.ndarray


class CropSampler:
    """Draws the ``BatchPlan`` of any step from (seed, rank, step, sample index) alone."""

    def __init__(
        self,
        cache_dir: str | Path,
        case_ids: list[str],
        shapes: list[tuple[int, ...]],
        crop_size: tuple[int, int, int],
        batch_size: int,
        *,
        labeled: bool,
        seed: int,
        rank: int,
        foreground_oversample: float,
        augment: bool,
        config: AugmentConfig | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.case_ids = case_ids
        self.shapes = [tuple(int(v) for v in s) for s in shapes]  # spatial (Z, Y, X) per case
        self.crop_size = tuple(int(c) for c in crop_size)
        self.batch_size = int(batch_size)
        self.labeled = labeled
        self.seed = int(seed)
        self.rank = int(rank)
        self.fg_prob = float(foreground_oversample) if labeled else 0.0
        self.augment = augment
        self.config = config or AugmentConfig()
        self._fg: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def plan(self, step: int) -> BatchPlan:
        """The samples of ``step`` (pure function of seed, rank and step)."""
        rows = [self._sample(step, i) for i in range(self.batch_size)]
        return BatchPlan(*(np.stack(col) for col in zip(*rows, strict=True)))

    def _sample(self, step: int, i: int) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng([self.seed, self.rank, int(step), i])
        case = int(rng.integers(len(self.case_ids)))
        shape = np.array(self.shapes[case])
        crop = np.array(self.crop_size)
        # Start range lets a crop larger than the volume place the volume anywhere inside it (padding).
        lo, hi = np.minimum(0, shape - crop), np.maximum(0, shape - crop)
        want_fg = rng.random() < self.fg_prob
        centre = self._foreground_voxel(case, rng) if want_fg else None
        start = rng.integers(lo, hi + 1) if centre is None else np.clip(centre - crop // 2, lo, hi)
        cfg = self.config
        flips = rng.random(3) < cfg.flip_prob
        u = rng.random(4)
        noise_std = np.sqrt(rng.uniform(*cfg.noise_var)) if u[0] < cfg.noise_prob else 0.0
        bright = rng.uniform(*cfg.brightness) if u[1] < cfg.brightness_prob else 1.0
        contrast = rng.uniform(*cfg.contrast) if u[2] < cfg.contrast_prob else 1.0
        # nnU-Net's gamma: below or above 1 with equal chance, so darkening and brightening balance.
        if u[3] < cfg.gamma_prob:
            gamma = rng.uniform(cfg.gamma[0], 1.0) if rng.random() < 0.5 else rng.uniform(1.0, cfg.gamma[1])
        else:
            gamma = 1.0
        noise_seed = rng.integers(2**62)
        if not self.augment:
            flips = np.zeros(3, bool)
            bright, contrast, gamma, noise_std = 1.0, 1.0, 1.0, 0.0
        intensity = np.array([bright, contrast, gamma, noise_std], np.float32)
        return (
            np.int64(case),
            start.astype(np.int64),
            flips,
            intensity,
            np.int64(noise_seed),
            np.bool_(centre is not None),
        )

    def _foreground_voxel(self, case: int, rng: np.random.Generator) -> np.ndarray | None:
        """A random foreground voxel (z, y, x): a random class present, then a random stored voxel of it."""
        if case not in self._fg:
            fg = np.asarray(cached_array(self.cache_dir, self.case_ids[case], "fg"))  # names a damaged file
            classes, first = np.unique(fg[:, 0], return_index=True) if len(fg) else (np.zeros(0), np.zeros(0))
            self._fg[case] = (fg, classes, np.append(first, len(fg)).astype(np.int64))
        fg, classes, bounds = self._fg[case]
        if len(classes) == 0:
            return None
        k = int(rng.integers(len(classes)))
        row = int(rng.integers(bounds[k], bounds[k + 1]))
        return fg[row, 1:].astype(np.int64)


def read_crop(array: np.ndarray, start: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Crop the last three axes of ``array`` ((..., Z, Y, X), e.g. a memmap) at ``start`` with ``size``,
    zero-padding where the crop leaves the volume. Returns a new C-order array (..., *size)."""
    lead = array.shape[:-3]
    out = np.zeros((*lead, *size), dtype=array.dtype)
    src, dst = [], []
    for s, n, c in zip(start, array.shape[-3:], size, strict=True):
        a, b = max(int(s), 0), min(int(s) + c, n)
        src.append(slice(a, b))
        dst.append(slice(a - int(s), b - int(s)))
    out[(..., *dst)] = array[(..., *src)]
    return out
