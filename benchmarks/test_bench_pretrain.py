"""MAE pretraining step: visible-only (sparse) encoder vs the dense SimMIM-style baseline.

One training step = forward, masked-unit loss, backward and AdamW update, mask ratio 0.75, random
inputs. Ratios are computed inside one run (machines are noisy). Also reported per mode: the saved
activation bytes of the step (CPU and GPU) and the CUDA peak memory, the analytic encoder FLOPs
(``torch.utils.flop_counter``) of sparse vs dense, and the MAE decoder's share of the sparse step
(counted forward FLOPs, and decoder + loss forward/backward time against the whole step).

Run: pytest benchmarks/test_bench_pretrain.py --benchmark-only -s
"""

import gc
import math
import statistics
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from maeformer_fast.models import get_config
from maeformer_fast.models.mae import MaskedAutoencoder
from maeformer_fast.ops.masking import random_unit_mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (config, crop, batch): the small config everywhere, Synapse at its published crop on a GPU only.
CASES = {"small": ("small", (32, 48, 32), 4)}
if DEVICE.type == "cuda":
    CASES["synapse"] = ("synapse", (64, 128, 128), 2)
RESULTS: dict[tuple[str, str], dict[str, float]] = {}


def make_step(name, crop, batch, mode):
    torch.manual_seed(0)
    model = MaskedAutoencoder(get_config(name), encoder_mode=mode).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 1, *crop, device=DEVICE)
    unit_grid = model.encoder.unit_grid(crop)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else None

    def step():
        ids = random_unit_mask(batch, unit_grid, 0.75, device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = model(images, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return model, images, unit_grid, step


def saved_activation_bytes(model, images, unit_grid) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (the step's activation memory)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    ids = random_unit_mask(images.shape[0], unit_grid, 0.75, device=DEVICE)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, ids)
    return total


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["dense", "sparse"])  # dense first: the ratio is printed after sparse
def test_pretrain_step(benchmark, case, mode):
    name, crop, batch = CASES[case]
    if DEVICE.type == "cuda":  # drop earlier cases' tensors so the peak below is this case's own
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model, images, unit_grid, step = make_step(name, crop, batch, mode)
    step()  # warm-up
    benchmark.group = f"pretrain step {case} {DEVICE.type}"
    benchmark.pedantic(step, rounds=5 if DEVICE.type == "cuda" else 3, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    row = {
        "steps_per_s": 1.0 / mean,
        "voxels_per_s": batch * math.prod(crop) / mean,
        "saved_activation_mb": saved_activation_bytes(model, images, unit_grid) / 2**20,
    }
    if DEVICE.type == "cuda":
        row["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    RESULTS[(case, mode)] = row
    benchmark.extra_info.update(row)
    print(f"\n{case} {mode} on {DEVICE}: " + ", ".join(f"{k} {v:,.2f}" for k, v in row.items()))
    if mode == "sparse" and (case, "dense") in RESULTS:
        dense = RESULTS[(case, "dense")]
        speedup = row["steps_per_s"] / dense["steps_per_s"]
        memory = row["saved_activation_mb"] / dense["saved_activation_mb"]
        print(f"{case}: sparse/dense speed-up {speedup:.2f}x, activation memory {memory:.2f}x of dense")


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_flops_ratio(benchmark, case):
    """Analytic (counted) encoder forward FLOPs, sparse at mask ratio 0.75 vs dense."""
    name, crop, batch = CASES[case]
    flops = {}
    for mode in ("dense", "sparse"):
        model, images, unit_grid, _ = make_step(name, crop, batch, mode)
        ids = random_unit_mask(batch, unit_grid, 0.75, device=DEVICE)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.forward_encoder(images, ids)
        flops[mode] = counter.get_total_flops()
    ratio = flops["sparse"] / flops["dense"]
    benchmark.extra_info.update({"encoder_gflops_dense": flops["dense"] / 1e9, "encoder_gflops_sparse":
                                 flops["sparse"] / 1e9, "ratio": ratio})  # fmt: skip
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{case}: encoder GFLOPs dense {flops['dense'] / 1e9:.2f}, sparse {flops['sparse'] / 1e9:.2f} "
          f"(ratio {ratio:.3f}; visible share 0.25)")  # fmt: skip


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("case", list(CASES))
def test_decoder_share(benchmark, case):
    """The MAE decoder's cost within a sparse step: forward FLOPs counted per module, and the time of
    decoder + loss forward and backward (from fixed encoder features) against the whole step."""
    name, crop, batch = CASES[case]
    model, images, unit_grid, step = make_step(name, crop, batch, "sparse")
    ids = random_unit_mask(batch, unit_grid, 0.75, device=DEVICE)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images, ids)
    flops = {module: sum(ops.values()) for module, ops in counter.get_flop_counts().items()}
    flop_share = flops["MaskedAutoencoder.decoder"] / flops["MaskedAutoencoder"]
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else None
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
        features = model.forward_encoder(images, ids).detach().requires_grad_()

    def decoder_step():
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
            prediction = model.forward_decoder(features, ids, unit_grid)
            loss = model.forward_loss(images, prediction, ids)
        loss.backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    repeats = 10 if DEVICE.type == "cuda" else 5
    time_share = median_seconds(decoder_step, repeats) / median_seconds(step, repeats)
    benchmark.group = f"mae decoder {case} {DEVICE.type}"
    benchmark.pedantic(decoder_step, rounds=repeats, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(decoder_flop_share=flop_share, decoder_time_share=time_share)
    print(f"\n{case} sparse: MAE decoder {flops['MaskedAutoencoder.decoder'] / 1e9:.3f} of "
          f"{flops['MaskedAutoencoder'] / 1e9:.3f} forward GFLOPs ({flop_share:.1%}); decoder + loss "
          f"forward/backward {time_share:.1%} of the step time")  # fmt: skip
