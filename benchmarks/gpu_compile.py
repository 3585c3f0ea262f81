"""Training-step time eager vs compiled whole model vs compiled + CUDA graphs, on a CUDA machine.

For MAE pretraining (sparse and dense encoder) and fine-tuning, the library's own step
(``maeformer_fast.train.bench.training_step``: forward, loss, backward, clipping, AdamW) in bf16:

- ``eager``: no compilation;
- ``compiled``: ``--compile``, the whole model as one inductor graph (``prepare_model``);
- ``compiled+cudagraphs``: the same with ``mode="reduce-overhead"``: the compiled forward and
  backward replay as CUDA graphs (the optimizer step stays eager).

Each case's warm-up (three steps, compilation included) is timed apart from the measured steps. Cases
run in order of interest and every result is written at once (``compile_steps.json``), so a run cut
off by its time limit keeps what it measured.

    PYTHONPATH=. python benchmarks/gpu_compile.py --out $OUT
    PYTHONPATH=. python benchmarks/gpu_compile.py --cpu-smoke --out /tmp/x   # the logic, tiny, on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from maeformer_fast.train.bench import synchronize, time_steps, training_step

VARIANTS = {
    "eager": (False, None),
    "compiled+cudagraphs": (True, "reduce-overhead"),
    "compiled": (True, None),
}
CASES = [  # (task, model, crop, batch, encoder mode); fine-tuning first: the 2026-11-29 run never reached it
    ("finetune", "synapse", (64, 128, 128), 2, "dense"),
    ("pretrain", "synapse", (64, 128, 128), 8, "sparse"),
    ("pretrain", "synapse", (64, 128, 128), 8, "dense"),
    ("pretrain", "small", (32, 48, 32), 32, "sparse"),
    ("pretrain", "small", (32, 48, 32), 32, "dense"),
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per case")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny cases on the CPU, aot_eager backend")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to check the logic on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    precision = "fp32" if smoke else "bf16"
    overrides = {"embed_dim": 8, "num_heads": (1, 1, 2, 2)} if smoke else {}
    cases = [("pretrain", "small", (32, 32, 32), 1, "sparse")] if smoke else CASES
    variants = {"eager": (False, None), "compiled": (True, None)} if smoke else VARIANTS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if not smoke else "cpu", "torch": torch.__version__,
               "precision": precision, "rows": []}  # fmt: skip
    for variant, (compile_model, mode) in variants.items():  # eager first: quick and always useful
        for task, model, crop, batch, encoder in cases:
            row = {
                "task": task,
                "model": model,
                "crop": crop,
                "batch": batch,
                "encoder": encoder,
                "variant": variant,
            }
            try:
                step, _ = training_step(task, model, crop, batch, precision, device, encoder, overrides,
                                        compile_model, compile_backend="aot_eager" if smoke else "inductor",
                                        compile_mode=mode)  # fmt: skip
                started = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    for _ in range(3):
                        step()
                synchronize(device)
                row["warmup_s"] = time.perf_counter() - started
                row["fell_back"] = [
                    str(w.message)[:300] for w in caught if "of the model failed" in str(w.message)
                ]
                row.update(time_steps(step, device, args.seconds))
            except Exception as error:  # record and go on: one failure must not hide the rest
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                traceback.print_exc()
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "compile_steps.json").write_text(json.dumps(results, indent=2))
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
