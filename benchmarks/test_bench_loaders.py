"""Loader throughput (crops/s, unlabeled MAE batches: crops, flips, intensity augmentation, masks) of
every loader on this machine's device, next to the crops/s the sparse pretraining step of the small
config consumes there (``train.bench_loaders.bench_loaders``: the loaders are timed in alternating rounds,
median of 3). Loaders: torch workers (2), DALI when installed, the volumes held in device memory
(resident), and on CUDA the volumes in host memory with a prefetching copy (host-staged).

Data: the hippocampus cache (crop 32x48x32, batch 4; generated volumes of the same size when the data
is missing) and generated 128^3 phantoms (crop 64x64x64, batch 2).

Run: pytest benchmarks/test_bench_loaders.py -s   (prints one table per dataset)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maeformer_fast.bench.loaders import bench_loaders, limiting_verdict
from maeformer_fast.data import ensure_preprocessed, make_phantoms

HIPPO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Task04_Hippocampus"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DATASETS = {"hippocampus": ((32, 48, 32), 4), "phantom128": ((64, 64, 64), 2)}


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


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_loader_crops_per_second(caches: dict[str, Path], dataset: str) -> None:
    crop, batch = DATASETS[dataset]
    rows = bench_loaders(str(caches[dataset]), crop_size=crop, batch_size=batch, device=DEVICE, seconds=6.0)
    print(f"\n{dataset} {'x'.join(map(str, crop))} b{batch} on {DEVICE}, {torch.get_num_threads()} threads")
    for r in rows:
        print(f"  {r['name']:<16}{r['crops_per_s']:>10.1f} crops/s")
    print("  " + limiting_verdict(rows))
    assert all(r["crops_per_s"] > 0 for r in rows)
