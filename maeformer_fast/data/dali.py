"""DALI backend of ``make_loader``: fn.readers.numpy reads only the crop (ROI) of each memory-mapped
case, zero-padding where it leaves the volume; flips and brightness run in the pipeline (on the GPU
when ``device`` is CUDA, CPU-only with ``device_id=None`` otherwise).

Samples come from the same ``CropSampler`` as the torch backend, so both give the same batches for a
seed. DALI readers walk a fixed file list, so the pipeline is built per window of ``WINDOW`` steps with
the files of exactly those samples, and crop starts / flips / brightness are fed per sample through
``fn.external_source``. Contrast, gamma and noise are applied afterwards by the same torch code as the
torch backend, on the same device: DALI's noise generator cannot be seeded per sample, which exact
resume needs, and contrast/gamma then match the torch backend bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .batch import finish_batch
from .cache import case_file
from .sampling import BatchPlan, CropSampler

WINDOW = 256  # steps per pipeline build: amortises the build (~0.1 s) over many batches


def _import_dali() -> Any:
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401  (registers fn on the package)
        from nvidia.dali.plugin import pytorch as dali_torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "backend='dali' needs NVIDIA DALI (Linux only): pip install nvidia-dali-cuda130 "
            "(or pip install -e .[dali]); or use backend='torch'"
        ) from exc
    return dali


def dali_batches(
    sampler: CropSampler,
    labeled: bool,
    device: torch.device,
    start_step: int,
    num_workers: int | None,
    mask: tuple[tuple[int, int, int], float] | None = None,
) -> Iterator[dict[str, Any]]:
    """Infinite batches (see ``make_loader``) produced by DALI pipelines, window by window."""
    _import_dali()
    from nvidia.dali.plugin.pytorch import feed_ndarray

    threads = max(1, num_workers or 2)
    step = start_step
    while True:
        plans = [sampler.plan(s) for s in range(step, step + WINDOW)]
        pipe = _build(sampler, plans, labeled, device, threads)
        for k, plan in enumerate(plans):
            outputs = pipe.run()
            tensors = []
            for out in outputs:
                dense = out.as_tensor()
                dtype = torch.float32 if out is outputs[0] else torch.uint8
                t = torch.empty(dense.shape(), dtype=dtype, device=device)
                # feed_ndarray copies out of DALI's buffers, which the next run() reuses.
                feed_ndarray(
                    dense, t, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None
                )
                tensors.append(t)
            label = tensors[1][:, 0] if labeled else None
            yield finish_batch(
                tensors[0], label, plan, sampler, device, step + k, done="flips+brightness", mask=mask
            )
        del pipe
        step += WINDOW


def _build(sampler: CropSampler, plans: list[BatchPlan], labeled: bool, device: torch.device, threads: int):
    from nvidia.dali import fn, pipeline_def

    cases = np.concatenate([p.cases for p in plans])
    image_files = [str(case_file(sampler.cache_dir, sampler.case_ids[c], "image")) for c in cases]
    label_files = [str(case_file(sampler.cache_dir, sampler.case_ids[c], "label")) for c in cases]
    crop = np.array(sampler.crop_size, np.int32)
    gpu = device.type == "cuda"

    def params(info: Any) -> tuple[list[np.ndarray], ...]:
        # Iteration i of this pipeline is step i of the window; the reader wraps in the same rhythm.
        plan = plans[info.iteration % len(plans)]
        bright = plan.intensity[:, 0] if sampler.augment else np.ones(len(plan.cases), np.float32)
        return (
            [s.astype(np.int32) for s in plan.starts],
            [crop] * len(plan.cases),
            *([np.int32(f[a]) for f in plan.flips] for a in range(3)),
            [np.float32(b) for b in bright],
        )

    @pipeline_def(
        batch_size=sampler.batch_size,
        num_threads=threads,
        device_id=(device.index if device.index is not None else torch.cuda.current_device())
        if gpu
        else None,
        seed=sampler.seed,
        prefetch_queue_depth=2,
        exec_dynamic=True,
    )
    def pipeline():
        start, shape, fz, fy, fx, bright = fn.external_source(
            source=params, num_outputs=6, batch=True, batch_info=True
        )
        image = fn.readers.numpy(
            files=image_files,
            roi_start=start,
            roi_shape=shape,
            roi_axes=(1, 2, 3),
            out_of_bounds_policy="pad",
            fill_value=0.0,
            random_shuffle=False,
            name="images",
        )
        # .npy arrays carry no layout; flips need to know which axis is depth, height, width.
        image = fn.reshape(image.gpu() if gpu else image, layout="CDHW")
        image = fn.flip(image, depthwise=fz, vertical=fy, horizontal=fx) * (bright.gpu() if gpu else bright)
        if not labeled:
            return image
        label = fn.readers.numpy(
            files=label_files,
            roi_start=start,
            roi_shape=shape,
            roi_axes=(0, 1, 2),
            out_of_bounds_policy="pad",
            fill_value=0.0,
            random_shuffle=False,
            name="labels",
        )
        label = fn.reshape(label.gpu() if gpu else label, layout="DHW")
        # fn.flip has no plain DHW layout: add a channel axis (dropped again on the torch side).
        label = fn.expand_dims(label, axes=[0], new_axis_names="C")
        return image, fn.flip(label, depthwise=fz, vertical=fy, horizontal=fx)

    pipe = pipeline()
    pipe.build()
    return pipe
