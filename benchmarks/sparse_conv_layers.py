"""Per-layer time of the encoder's 3x3x3 convolutions at 25% visible: sparse forms vs the dense conv.

For every conv of the nnFormer encoder (embedding PE0-PE3, downsamplings DS0-DS2) on a random MAE mask,
times forward + backward (input and weight gradients) of:

- ``dense``: ``F.conv3d`` of the zero-filled masked grid (what a dense SimMIM-style encoder pays);
- ``block rows[idx]``: the block form's gather as it was before the per-step plan (halo blocks read with
  ``rows[index]``, whose backward accumulates every zero neighbour into one row; the int64 lookup grid
  it also built per layer is not timed here);
- ``block embedding``: the block form as the CPU path runs it now (``F.embedding`` with the zero row as
  padding_idx, so the backward skips it);
- ``triton``: the implicit-GEMM kernels over the neighbour table (CUDA, or with TRITON_INTERPRET=1).

Cases alternate within each repeat (the machine's noise hits all alike); the median is reported.

    OMP_NUM_THREADS=1 python benchmarks/sparse_conv_layers.py --model small --batch-size 4
    python benchmarks/sparse_conv_layers.py --model synapse --batch-size 2 --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from maeformer_fast.models import get_config
from maeformer_fast.models.plan import UNIT_STRIDE, plan_encoder
from maeformer_fast.ops.backend import triton_available
from maeformer_fast.ops.masking import random_unit_mask
from maeformer_fast.ops.sparse_conv import sparse_conv3d, transposed_table, unit_block_conv3d

MASK_RATIO = 0.75


def encoder_convs(config):
    """(name, C_in, C_out, stride) of every conv of the encoder, in order."""
    first, second = config.embedding_strides
    half, embed = config.embed_dim // 2, config.embed_dim
    convs = [("PE0", config.in_channels, half, first), ("PE1", half, half, UNIT_STRIDE),
             ("PE2", half, embed, second), ("PE3", embed, embed, UNIT_STRIDE)]  # fmt: skip
    for i, stride in enumerate(config.downsampling_strides):
        convs.append((f"DS{i}", config.stage_dim(i), 2 * config.stage_dim(i), stride))
    return convs


def layouts_in_order(plan, convs):
    """The input layout of every conv in ``convs``, following the plan's chain."""
    layout, out = plan.input, []
    for index, (_, _, _, stride) in enumerate(convs):
        if index == 4:
            layout = plan.stages[0]
        elif index > 4:
            layout = plan.stages[index - 4]
        out.append(layout)
        if index < 4:
            layout = layout.conv(stride).out
    return out


def block_form_before_the_plan(x, halo, w, b, stride):
    """The block form's gather as it was: ``rows[halo]`` (index backward = index_put with accumulate)."""
    blocks = torch.cat([x, x.new_zeros(1, x.shape[1])])[halo]
    out = F.conv3d(blocks.permute(0, 4, 1, 2, 3), w, b, stride=stride)
    return out.permute(0, 2, 3, 4, 1).reshape(-1, w.shape[0])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", nargs="*", help="only these layers (e.g. PE1 DS0)")
    parser.add_argument("--out", help="folder for sparse_conv_<model>_b<N>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = get_config(args.model)
    crop, batch = config.crop_size, args.batch_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    unit_grid = tuple(c // t for c, t in zip(crop, config.total_stride))
    ids = random_unit_mask(batch, unit_grid, MASK_RATIO, device=device)
    plans = {
        backend: plan_encoder(get_config(args.model, conv_backend=backend), batch, crop, device, ids)
        for backend in ("torch", "triton")
        if backend == "torch" or triton_available()
    }
    convs = encoder_convs(config)
    layouts = {backend: layouts_in_order(plan, convs) for backend, plan in plans.items()}
    rows = []
    threads = torch.get_num_threads()
    print(f"{args.model}, crop {crop}, batch {batch}, {device}, {dtype}, {threads} threads, 25% visible")
    for index, (name, c_in, c_out, stride) in enumerate(convs):
        if args.layers and name not in args.layers:
            continue
        torch_layout = layouts["torch"][index]
        conv_plan = torch_layout.conv(stride)
        num_in = torch_layout.coords.shape[0]
        x = torch.randn(num_in, c_in, device=device, dtype=dtype, requires_grad=True)
        w = (
            torch.randn(c_out, c_in, 3, 3, 3, device=device, dtype=dtype) / (27 * c_in) ** 0.5
        ).requires_grad_()
        b = torch.zeros(c_out, device=device, dtype=dtype, requires_grad=True)
        dense_in = torch.zeros(batch, c_in, *torch_layout.grid, device=device, dtype=dtype)
        coords = torch_layout.coords
        dense_in[torch_layout.batch, :, coords[:, 0], coords[:, 1], coords[:, 2]] = x.detach()
        dense_in.requires_grad_()

        cases = {
            "dense": partial(F.conv3d, dense_in, w, b, stride=stride, padding=1),
            "block rows[idx]": partial(block_form_before_the_plan, x, conv_plan.halo, w, b, stride),
            "block embedding": partial(unit_block_conv3d, x, conv_plan.halo, w, b, stride),
        }
        if "triton" in layouts:
            table = layouts["triton"][index].conv(stride).table
            cases["triton"] = partial(sparse_conv3d, x, table, transposed_table(table, num_in), w, b)
        inputs = {"dense": [dense_in, w, b]}
        times = {case: [] for case in cases}
        for repeat in range(args.repeats + 1):  # the first round warms up (Triton compiles, caches fill)
            for case, fn in cases.items():
                grads = inputs.get(case, [x, w, b])
                out = fn()
                cotangent = torch.ones_like(out)
                sync(device)
                started = time.perf_counter()
                torch.autograd.grad(fn(), grads, cotangent)
                sync(device)
                if repeat:
                    times[case].append(1e3 * (time.perf_counter() - started))
        medians = {case: statistics.median(t) for case, t in times.items()}
        row = {"layer": name, "c_in": c_in, "c_out": c_out, "stride": stride, "tokens_in": num_in, **medians}
        rows.append(row)
        speedups = ", ".join(f"{c} {medians['dense'] / m:.2f}x" for c, m in medians.items() if c != "dense")
        timings = ", ".join(f"{c} {m:.2f} ms" for c, m in medians.items())
        print(f"{name} {c_in}->{c_out} s{stride} T_in={num_in}: {timings} | vs dense: {speedups}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        meta = {
            "model": args.model,
            "batch": batch,
            "device": str(device),
            "dtype": str(dtype),
            "threads": threads,
        }
        if device.type == "cuda":
            meta["gpu"] = torch.cuda.get_device_name()
        path = Path(args.out) / f"sparse_conv_{args.model}_b{batch}.json"
        path.write_text(json.dumps({**meta, "layers": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
