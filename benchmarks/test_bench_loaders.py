"""Loader throughput (crops/s) of the torch and DALI backends, augmentation on, on this machine's
device. Data: the hippocampus cache (crop 32x48x32, batch 4; generated volumes of the same size when
the data is missing) and generated 128^3 phantoms (crop 64x64x64, batch 2).

Run: pytest benchmarks/test_bench_loaders.py --benchmark-only -s
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from maeformer_fast.data import ensure_preprocessed, make_loader, make_phantoms

HIPPO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Task04_Hippocampus"
HAS_DALI = (
    importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DATASETS = {"hippocampus": ((32, 48, 32), 4), "phantom128": ((64, 64, 64), 2)}
STEPS = 20


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    if HIPPO.is_dir():
        hippo = ensure_preprocessed(HIPPO, progress=False)  # reused between runs (~/.cache)
    else:
        src = make_phantoms(root / "h", num_labeled=16, num_unlabeled=0, shape=(36, 50, 35))
        hippo = ensure_preprocessed(src, root / "hc", progress=False)
    big = make_phantoms(root / "p", num_labeled=4, num_unlabeled=0, shape=(128, 128, 128))
    return {"hippocampus": hippo, "phantom128": ensure_preprocessed(big, root / "pc", progress=False)}


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_loader_crops_per_second(benchmark, caches: dict[str, Path], backend: str, dataset: str) -> None:
    if backend == "dali" and not HAS_DALI:
        pytest.skip("nvidia.dali not installed")
    crop, batch = DATASETS[dataset]
    it = make_loader(caches[dataset], crop, batch, backend=backend, device=DEVICE, num_workers=2)
    next(it)  # warm-up: worker start / pipeline build

    def run() -> None:
        for _ in range(STEPS):
            out = next(it)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        assert out["image"].shape == (batch, 1, *crop)

    benchmark.group = f"loader {dataset} {'x'.join(map(str, crop))} b{batch} on {DEVICE}"
    benchmark.pedantic(run, rounds=3, iterations=1)
    rate = STEPS * batch / benchmark.stats.stats.mean
    benchmark.extra_info["crops_per_s"] = rate
    print(f"\n{backend} {dataset} {crop} b{batch} {DEVICE}: {rate:,.0f} crops/s")
