"""Training batches from a preprocessed cache: one interface, two backends (torch workers, DALI).

Both backends draw the same samples (``sampling.CropSampler``): the batch of a step is a pure function
of (seed, rank, step), so a run resumed with ``start_step=N`` continues with exactly the batches an
uninterrupted run saw from step N, and ranks draw different samples.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..types import Triple
from .batch import augment_batch, finish_batch
from .cache import load_plan, open_case, select_cases
from .resident import DEFAULT_MEMORY_SHARE, choose_placement, image_storage_dtype, resident_batches
from .sampling import AugmentConfig, CropSampler, read_crop

DEFAULT_BACKEND = "torch"  # chosen by benchmarks/test_bench_loaders.py, see docs/data.md


def make_loader(
    cache_dir: str | Path,
    crop_size: Sequence[int],
    batch_size: int,
    *,
    labeled: bool = True,
    cases: list[str] | None = None,
    backend: str = DEFAULT_BACKEND,
    device: str | torch.device = "cpu",
    seed: int = 0,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    foreground_oversample: float = 0.33,
    augment: bool = True,
    num_workers: int | None = None,
    augment_config: AugmentConfig | None = None,
    data_on_device: str = "off",
    memory_share: float = DEFAULT_MEMORY_SHARE,
    image_dtype: torch.dtype | None = None,
    mask: tuple[Triple, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """Infinite iterator of training batches from the cache folder ``cache_dir``.

    Each batch is a dict: ``"image"`` float32 (B, C, Z, Y, X) on ``device``; ``"label"`` int64
    (B, Z, Y, X) on ``device`` (only when ``labeled``); ``"case_ids"`` list of B str; ``"step"`` int.
    Crops of ``crop_size`` (z, y, x) are random, a ``foreground_oversample`` share of labeled samples
    centred on a random foreground voxel; volumes smaller than the crop are zero-padded. ``augment``
    adds random flips on all three axes and intensity augmentation (noise, brightness, contrast,
    gamma). ``cases``: case ids to draw from (default all; all labeled ones if ``labeled``).
    ``world_size`` is checked only: ranks differ through ``rank`` in the sample seeds.

    ``data_on_device``: "off" streams crops from the memory-mapped cache with ``backend``; "on" holds
    every case in ``device`` memory and cuts batches there (``resident.py``); "auto" does so when the
    cache fits in ``memory_share`` of the device's free memory, else (CUDA) holds it in host memory
    with a prefetching copy, else falls back to ``backend`` with a line on stderr. ``image_dtype``:
    how resident images are stored (default float32 on the CPU, float16 on CUDA where the values
    fit). ``mask`` = (unit grid, mask ratio) adds ``"visible_ids"`` (B, K) int64 on ``device``: the
    MAE's visible units of the step, from the per-step generator pretraining has always used.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    sampler = make_sampler(
        cache_dir,
        crop_size,
        batch_size,
        labeled=labeled,
        cases=cases,
        seed=seed,
        rank=rank,
        foreground_oversample=foreground_oversample,
        augment=augment,
        augment_config=augment_config,
    )
    device = torch.device(device)
    if backend not in ("torch", "dali"):
        raise ValueError(f"backend must be 'torch' or 'dali', got {backend!r}")
    dtype = image_dtype or image_storage_dtype(sampler, device)
    placement = choose_placement(sampler, labeled, device, data_on_device, memory_share, dtype)
    if placement is not None:
        staged = placement != device
        return resident_batches(sampler, labeled, device, start_step, staged, dtype, mask)
    if backend == "torch":
        return _torch_batches(sampler, labeled, device, start_step, num_workers, mask)
    from .dali import dali_batches

    return dali_batches(sampler, labeled, device, start_step, num_workers, mask)


def make_sampler(
    cache_dir: str | Path,
    crop_size: Sequence[int],
    batch_size: int,
    *,
    labeled: bool = True,
    cases: list[str] | None = None,
    seed: int = 0,
    rank: int = 0,
    foreground_oversample: float = 0.33,
    augment: bool = True,
    augment_config: AugmentConfig | None = None,
) -> CropSampler:
    """The CropSampler ``make_loader`` uses with the same arguments (its ``plan(step)`` tells which
    crops, flips and intensity changes a step gets)."""
    if len(crop_size) != 3 or min(crop_size) < 1:
        raise ValueError(f"crop_size must be 3 positive sizes (z, y, x), got {tuple(crop_size)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = load_plan(cache_dir)
    case_ids = select_cases(plan, cases, labeled)
    # Every case opened once here (images and labels), so a damaged cache fails now, naming the file,
    # rather than mid-run inside a loader worker.
    shapes = [open_case(cache_dir, c, labeled)[0].shape[1:] for c in case_ids]
    return CropSampler(
        cache_dir,
        case_ids,
        shapes,
        tuple(crop_size),
        batch_size,
        labeled=labeled,
        seed=seed,
        rank=rank,
        foreground_oversample=foreground_oversample,
        augment=augment,
        config=augment_config,
    )


class _StepCrops(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is the whole un-augmented batch of that step (numpy)."""

    def __init__(self, sampler: CropSampler, labeled: bool, augment_here: bool) -> None:
        self.sampler = sampler
        self.labeled = labeled
        self.augment_here = augment_here
        self._open: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:  # never used for an infinite sampler, but Dataset wants one
        return 2**62

    def __getitem__(self, step: int) -> dict[str, Any]:
        s = self.sampler
        plan = s.plan(step)
        images, labels = [], []
        for case, start in zip(plan.cases.tolist(), plan.starts, strict=True):
            if case not in self._open:  # memmaps opened lazily, so each worker opens its own
                self._open[case] = open_case(s.cache_dir, s.case_ids[case], self.labeled)
            image, label = self._open[case]
            images.append(read_crop(image, start, s.crop_size))
            if label is not None:
                labels.append(read_crop(label, start, s.crop_size))
        image_t = torch.from_numpy(np.stack(images))
        label_t = torch.from_numpy(np.stack(labels)) if labels else None
        if self.augment_here and s.augment:
            image_t, label_t = augment_batch(image_t, label_t, plan)
        return {"image": image_t, "label": label_t, "plan": plan, "step": step}


class _Steps(torch.utils.data.Sampler):
    """start_step, start_step + 1, ... forever."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def default_num_workers() -> int:
    """Loader worker processes: one per core up to 4 (crops are cheap; more only adds memory)."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _identity(item: dict[str, Any]) -> dict[str, Any]:
    return item  # the dataset already returns whole batches as tensors


def _torch_batches(
    sampler: CropSampler,
    labeled: bool,
    device: torch.device,
    start_step: int,
    num_workers: int | None,
    mask: tuple[Triple, float] | None,
) -> Iterator[dict[str, Any]]:
    workers = default_num_workers() if num_workers is None else int(num_workers)
    # On a CPU "training device" the loader workers are that device: augmenting there runs in
    # parallel with training, and each worker uses one torch thread (measured: torch's two intra-op
    # threads on small crops in the main process, next to busy workers, ran ~20x slower).
    on_cpu = device.type == "cpu"
    loader = torch.utils.data.DataLoader(
        _StepCrops(sampler, labeled, augment_here=on_cpu),
        batch_size=None,
        sampler=_Steps(start_step),
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    for item in loader:
        yield finish_batch(
            item["image"],
            item["label"],
            item["plan"],
            sampler,
            device,
            item["step"],
            done="all" if on_cpu else "none",
            mask=mask,
        )
