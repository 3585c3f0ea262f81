"""Memory-resident loading: every case of the cache held once in memory, batches cut by one gather.

Where the cache fits in a share of the training device's free memory (``data_on_device``: "auto"
measures, "on" forces), all images and labels are loaded once into two flat tensors on the device,
and each step's batch is one ``torch.take`` per array: crop starts, zero padding and flips are folded
into the gather's index, then brightness, contrast, gamma and noise run on the device with the same
code as the worker loader (``loaders.augment_batch``'s intensity part) and the MAE masks come from the
same per-step generator as in pretraining. The plan of a step (cases, starts, flips, intensity
parameters, foreground centres) is ``CropSampler.plan`` on the host, as in every other backend, so a
seed gives the same batches whichever loader runs, across resumes and ranks (tested bit for bit on
the CPU).

On a CUDA device whose memory the cache does not fit, the volumes stay in pinned host memory: the
gather runs on the host into a pinned buffer, a side stream copies it to the device one step ahead,
and the augmentation runs on the device. On the CPU the "device" is host RAM.

Storage: labels uint8; images float32 on the CPU (batches bit-identical to the worker loader's) and
float16 on CUDA where every value is within float16's range (half the memory and gather traffic; the
batch is converted to float32 before augmentation, so it differs from the worker loader's by the
float16 rounding of the stored values only).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..types import Triple
from .batch import finish_batch
from .cache import open_case
from .sampling import BatchPlan, CropSampler

PLACEMENTS = ("auto", "on", "off")
DEFAULT_MEMORY_SHARE = 0.5  # of the free memory measured when the loader starts
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Volumes:
    """All cases of a sampler in two flat tensors on one device, with a zero element at the end of
    each that the index of every padded voxel points to.

    ``image``: (sum_i C * Z_i * Y_i * X_i + 1,) float32 or float16; ``label``: (sum_i Z_i * Y_i * X_i
    + 1,) uint8, or None for unlabeled loading; ``table``: (N, 6) int64 per case (image offset, label
    offset, Z, Y, X, channels' stride Z * Y * X); ``channels``: C, the same for every case.
    """

    image: torch.Tensor
    label: torch.Tensor | None
    table: torch.Tensor
    channels: int

    @classmethod
    def load(
        cls, sampler: CropSampler, labeled: bool, device: torch.device, image_dtype: torch.dtype
    ) -> Volumes:
        """Read every case of ``sampler`` once (unreadable files are named by ``open_case``) and put
        it on ``device``."""
        arrays = [open_case(sampler.cache_dir, c, labeled) for c in sampler.case_ids]
        channels = int(arrays[0][0].shape[0])
        voxels = np.array([math.prod(s) for s in sampler.shapes], np.int64)
        image_offsets = np.concatenate([[0], np.cumsum(voxels * channels)])
        label_offsets = np.concatenate([[0], np.cumsum(voxels)])
        table = np.column_stack(
            [image_offsets[:-1], label_offsets[:-1], np.array(sampler.shapes, np.int64), voxels]
        )
        image = torch.zeros(int(image_offsets[-1]) + 1, dtype=image_dtype)
        label = torch.zeros(int(label_offsets[-1]) + 1, dtype=torch.uint8) if labeled else None
        for i, (case_image, case_label) in enumerate(arrays):
            a, b = image_offsets[i : i + 2]
            np.copyto(image[a:b].numpy(), case_image.reshape(-1), casting="same_kind")
            if label is not None:
                a, b = label_offsets[i : i + 2]
                np.copyto(label[a:b].numpy(), case_label.reshape(-1))
        return cls(
            image.to(device),
            None if label is None else label.to(device),
            torch.from_numpy(table).to(device),
            channels,
        )

    def crops(
        self, plan: torch.Tensor, crop: Triple, out: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flipped, zero-padded crops of a batch: one ``torch.take`` per array, no host read.

        ``plan``: (B, 7) int64 on this device, per sample (case, start z, y, x, flip z, y, x) (see
        :func:`plan_rows`). Returns image (B, C, *crop) in the stored dtype and label (B, *crop)
        uint8 (None when unlabeled), written into ``out`` when given (pinned host buffers).
        """
        rows = self.table[plan[:, 0]]  # (B, 6)
        spatial = torch.zeros((), dtype=torch.int64, device=plan.device)
        valid = torch.ones((), dtype=torch.bool, device=plan.device)
        strides = (rows[:, 3] * rows[:, 4], rows[:, 4], torch.ones_like(rows[:, 4]))
        for axis, size in enumerate(crop):
            k = torch.arange(size, device=plan.device)
            flipped = torch.where(plan[:, 4 + axis, None].bool(), size - 1 - k, k)
            coord = plan[:, 1 + axis, None] + flipped  # (B, size) voxel index in the volume
            view = [-1, 1, 1, 1]
            view[1 + axis] = size
            inside = (coord >= 0) & (coord < rows[:, 2 + axis, None])
            valid = valid & inside.view(view)
            spatial = spatial + (coord * strides[axis][:, None]).view(view)
        channel = torch.arange(self.channels, device=plan.device).view(1, -1, 1, 1, 1)
        image_index = rows[:, 0].view(-1, 1, 1, 1, 1) + channel * rows[:, 5].view(-1, 1, 1, 1, 1)
        image_index = torch.where(valid[:, None], image_index + spatial[:, None], self.image.numel() - 1)
        image_out, label_out = out if out is not None else (None, None)
        image = torch.take(self.image, image_index, out=image_out)
        if self.label is None:
            return image, None
        label_index = torch.where(valid, rows[:, 1].view(-1, 1, 1, 1) + spatial, self.label.numel() - 1)
        return image, torch.take(self.label, label_index, out=label_out)


def plan_rows(plan: BatchPlan) -> torch.Tensor:
    """(B, 7) int64 host tensor (case, start z, y, x, flip z, y, x) of a BatchPlan, for ``crops``."""
    rows = np.column_stack([plan.cases, plan.starts, plan.flips.astype(np.int64)])
    return torch.from_numpy(rows.astype(np.int64))


def storage_bytes(sampler: CropSampler, labeled: bool, image_dtype: torch.dtype) -> int:
    """Bytes :meth:`Volumes.load` allocates for ``sampler``'s cases (images, and labels if
    ``labeled``), read from the array headers."""
    voxels = sum(math.prod(s) for s in sampler.shapes)
    channels = int(open_case(sampler.cache_dir, sampler.case_ids[0], False)[0].shape[0])
    return voxels * (channels * torch.empty((), dtype=image_dtype).element_size() + int(labeled))


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, MemAvailable of the host
    otherwise (pages the kernel can hand out without swapping)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: physical pages free
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def image_storage_dtype(sampler: CropSampler, device: torch.device) -> torch.dtype:
    """float16 on CUDA when every stored image value is within float16's range, float32 otherwise
    (and always on the CPU, where batches must equal the worker loader's bit for bit)."""
    if device.type != "cuda":
        return torch.float32
    for case in sampler.case_ids:
        image = open_case(sampler.cache_dir, case, False)[0]
        if not np.all(np.abs(image) <= FLOAT16_MAX):
            return torch.float32
    return torch.float16


def choose_placement(
    sampler: CropSampler,
    labeled: bool,
    device: torch.device,
    data_on_device: str,
    memory_share: float,
    image_dtype: torch.dtype,
) -> torch.device | None:
    """Where the volumes go: ``device``, the host (CUDA runs whose device memory the cache does not
    fit), or None (stream from disk with the worker loader; a line on stderr says why)."""
    if data_on_device not in PLACEMENTS:
        raise ValueError(f"data_on_device must be one of {PLACEMENTS}, got {data_on_device!r}")
    if data_on_device == "off":
        return None
    if data_on_device == "on":
        return device
    need = storage_bytes(sampler, labeled, image_dtype)
    where = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    fits = [p for p in where if need <= memory_share * free_memory(p)]
    place = fits[0] if fits else None
    if place != device:
        then = "held in host memory, copied ahead" if place else "read from disk by loader workers"
        print(
            f"data: the cache ({need / 2**30:.2f} GiB in memory) does not fit in {memory_share:.0%} of "
            f"the free memory of {device}: crops are {then}",
            file=sys.stderr,
            flush=True,
        )
    return place


def resident_batches(
    sampler: CropSampler,
    labeled: bool,
    device: torch.device,
    start_step: int,
    staged: bool,
    image_dtype: torch.dtype,
    mask: tuple[Triple, float] | None,
) -> Iterator[dict[str, Any]]:
    """Infinite batches (see ``make_loader``) cut from volumes held on the training ``device`` itself,
    or (``staged``) on the host, gathered there one step ahead into (on CUDA pinned) buffers and copied
    to ``device`` on a side stream."""
    volumes = Volumes.load(sampler, labeled, torch.device("cpu") if staged else device, image_dtype)
    copy_stream = torch.cuda.Stream(device) if staged and device.type == "cuda" else None

    def cut(step: int) -> tuple[BatchPlan, torch.Tensor, torch.Tensor | None, Any]:
        plan = sampler.plan(step)
        rows = plan_rows(plan)
        if not staged:
            if device.type == "cuda":  # from pinned memory the copy queues behind the device's work
                rows = rows.pin_memory()
            return plan, *volumes.crops(rows.to(device, non_blocking=True), sampler.crop_size), None
        out = _host_buffers(len(rows), volumes, sampler.crop_size, copy_stream is not None)
        image, label = volumes.crops(rows, sampler.crop_size, out)
        if copy_stream is None:
            return plan, image, label, None
        with torch.cuda.stream(copy_stream):
            image = image.to(device, non_blocking=True)
            label = None if label is None else label.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        return plan, image, label, done

    pending = cut(start_step)
    for step in itertools.count(start_step):
        plan, image, label, copied = pending
        # Cut the next step's batch (on the host when staged) while the device works on this one.
        pending = cut(step + 1)
        if copied is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(copied)
            for t in (image, label):
                if t is not None:
                    t.record_stream(current)
        image = image.float()
        yield finish_batch(image, label, plan, sampler, device, step, done="flips", mask=mask)


def _host_buffers(
    batch: int, volumes: Volumes, crop: Triple, pinned: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fresh host tensors for one staged batch (pinned ones come from torch's caching host allocator,
    which reuses a buffer only after the copy that read it has finished): image (B, C, *crop), label
    (B, *crop)."""
    image = torch.empty((batch, volumes.channels, *crop), dtype=volumes.image.dtype, pin_memory=pinned)
    if volumes.label is None:
        return image, None
    return image, torch.empty((batch, *crop), dtype=torch.uint8, pin_memory=pinned)
