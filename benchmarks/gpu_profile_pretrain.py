"""Where a GPU pretraining step spends its time: torch.profiler tables for sparse vs dense MAE steps.

Run on a CUDA machine: python benchmarks/gpu_profile_pretrain.py --out $OUT
Writes profile_<config>_<mode>.txt (top ops by CPU and by CUDA time, host-sync counts) and
step_times.json (ms per step at several batch sizes, bf16).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from maeformer_fast.models import get_config
from maeformer_fast.models.mae import MaskedAutoencoder
from maeformer_fast.ops.masking import random_unit_mask


def build(name: str, mode: str, batch: int, crop):
    torch.manual_seed(0)
    model = MaskedAutoencoder(get_config(name), encoder_mode=mode).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 1, *crop, device="cuda")
    grid = model.encoder.unit_grid(crop)

    def step():
        ids = random_unit_mask(batch, grid, 0.75, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(images, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_step(step, repeats: int = 5) -> float:
    step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script profiles GPU steps", file=sys.stderr)
        return 2
    out = Path(args.out)
    cases = {"small": ((32, 48, 32), [4, 32]), "synapse": ((64, 128, 128), [2, 8])}
    times = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "ms_per_step": {}}
    for name, (crop, batches) in cases.items():
        for mode in ("dense", "sparse"):
            for batch in batches:
                key = f"{name} {mode} b{batch}"
                try:
                    times["ms_per_step"][key] = time_step(build(name, mode, batch, crop))
                except Exception as error:  # record and go on: one failure must not hide the rest
                    times["ms_per_step"][key] = f"failed: {type(error).__name__}: {error}"
                print(key, times["ms_per_step"][key], flush=True)
                torch.cuda.empty_cache()
            step = build(name, mode, batches[0], crop)
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            table = prof.key_averages()
            text = [
                table.table(sort_by="self_cpu_time_total", row_limit=25),
                table.table(sort_by="self_cuda_time_total", row_limit=25),
            ]
            (out / f"profile_{name}_{mode}.txt").write_text("\n\n".join(text))
            # After every mode: a run stopped at its time limit keeps what it measured.
            (out / "step_times.json").write_text(json.dumps(times, indent=2))
    print(json.dumps(times, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
