"""Training-step throughput on a CUDA machine: sparse vs dense MAE, bf16 vs fp32, compiled vs eager.

Every case runs the project's own training step (``Optimisation.accumulate`` + ``step``: autocast,
loss, backward, gradient clipping, AdamW and the LR schedule, and the per-step ``.item()`` of the
loss check) on random inputs made on the GPU; no data pipeline is involved.

Cases (see ``plan_cases`` for the order; every case is guarded, a failure is recorded):
    flops       counted encoder forward FLOPs sparse/dense (torch.utils.flop_counter; kernels inside
                the Triton attention are invisible to it, so attention matmuls are not counted)
    pretrain    sparse (visible-only, Triton attention) and dense (SimMIM-style) MAE at mask ratio
                0.75, small (crop 32x48x32, batch 8) and synapse (crop 64x128x128, batch 2), bf16
    finetune    dense NNFormer segmentation step (Dice + CE, deep supervision), small and synapse, bf16
    fp32        the four pretraining cases in fp32
    checkpoint  synapse pretraining with activation checkpointing of the blocks (memory vs speed)
    compiled    torch.compile (inductor) of the transformer blocks, pretraining and synapse finetuning,
                bf16; the warm-up time (3 steps) includes the compilation
The budget is checked before every case (a compiled one needs 40 s left) and enforced inside a case by
an alarm; results are written after every case.

Reported per case: ms/step, steps/s, voxels/s (crop voxels x batch per second), the peak of
torch.cuda.max_memory_allocated during the steps (weights, optimizer state and activations), and the
static memory before the first step.

On a CPU (``--cpu``) the small shape at batch 2 runs in fp32, sparse and dense pretraining and
finetuning, each eager and compiled (inductor; needs a C++ compiler): the CPU effect of ``--compile``.

Run:  python benchmarks/gpu_training.py --out $OUT --budget-s 150
      (writes $OUT/training.json and $OUT/training.md, the run as a section for benchmarks/RESULTS.md)
      python benchmarks/gpu_training.py --cpu --budget-s 400         (the compile effect on this CPU)
      python benchmarks/gpu_training.py --cpu-smoke                 (tiny shapes on CPU, torch attention)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from maeformer_fast.bench.steps import MASK_RATIO, measure_step, training_step
from maeformer_fast.cli.info import environment_report
from maeformer_fast.ops.masking import random_unit_mask
from maeformer_fast.train import pretrain as pt

# name -> (model config, crop, batch, model overrides)
SHAPES = {
    "small": ("small", (32, 48, 32), 8, {}),
    "synapse": ("synapse", (64, 128, 128), 2, {}),
}
SMOKE_SHAPES = {  # the small config's structure at a narrow width, tiny crops
    "small": ("small", (32, 32, 32), 1, {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}),
    "synapse": ("small", (32, 48, 32), 1, {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}),
}
CPU_SHAPES = {"small": ("small", (32, 48, 32), 2, {})}
COMPILE_MIN_BUDGET_S = 40.0  # a compiled case starts only with this much budget left (compiles are slow)


@dataclass
class Case:
    task: str  # "pretrain" or "finetune"
    shape: str  # key of SHAPES
    mode: str = "dense"  # pretraining encoder: "sparse" or "dense"
    precision: str = "bf16"
    compile: bool = False
    checkpointing: bool = False

    @property
    def name(self) -> str:
        parts = [self.task, self.shape, self.mode if self.task == "pretrain" else "", self.precision]
        parts += ["compiled" if self.compile else "", "ckpt" if self.checkpointing else ""]
        return " ".join(p for p in parts if p)


def plan_cases() -> list[Case]:
    """Most wanted first: the budget cuts the tail."""
    sparse_dense = ("sparse", "dense")
    cases = [Case("pretrain", s, m) for s in SHAPES for m in sparse_dense]
    cases += [Case("pretrain", "synapse", m, precision="fp32") for m in sparse_dense]
    cases += [Case("finetune", s) for s in SHAPES]
    cases += [Case("pretrain", "synapse", "sparse", compile=True), Case("finetune", "synapse", compile=True)]
    cases += [Case("pretrain", "small", m, precision="fp32") for m in sparse_dense]
    cases += [Case("pretrain", "synapse", m, checkpointing=True) for m in sparse_dense]
    cases += [
        Case("pretrain", "small", "sparse", compile=True),
        Case("pretrain", "synapse", "dense", compile=True),
    ]
    return cases


def plan_cpu_cases() -> list[Case]:
    """The small shape in fp32, every case eager then compiled."""
    base = [Case("pretrain", "small", m, precision="fp32") for m in ("sparse", "dense")]
    base.append(Case("finetune", "small", precision="fp32"))
    return [Case(**{**asdict(c), "compile": compiled}) for c in base for compiled in (False, True)]


def run_case(case: Case, shapes: dict, device: torch.device, backend: str, seconds: float) -> dict:
    """Warm up (compiles included), then time steps for about ``seconds`` (at least 3)."""
    row: dict = {"case": case.name, **asdict(case)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model_name, crop, batch, overrides = shapes[case.shape]
    step, voxels = training_step(case.task, model_name, crop, batch, case.precision, device, case.mode,
                                 overrides, case.compile, case.checkpointing, backend)  # fmt: skip
    if device.type == "cuda":
        row["static_mib"] = torch.cuda.memory_allocated() / 2**20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 3 warm-up steps: sparse masks change the window counts, a dynamic-shape recompile at step 2.
        row.update(measure_step(step, voxels, device, seconds, warmup_steps=3))
    fallback = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    if fallback:
        raise RuntimeError(fallback[0])
    return row


def encoder_flops(shapes: dict, device: torch.device) -> dict:
    """Counted encoder forward FLOPs, sparse and dense, per shape."""
    result = {}
    for shape, (model_name, crop, batch, overrides) in shapes.items():
        counts = {}
        for mode in ("sparse", "dense"):
            with device:
                model = pt.build_mae(pt.PretrainConfig(data="", out="", model=model_name, encoder=mode,
                                                       model_overrides=overrides))  # fmt: skip
                images = torch.randn(batch, 1, *crop)
            ids = random_unit_mask(batch, model.encoder.unit_grid(crop), MASK_RATIO, device=device)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model.forward_encoder(images, ids)
            counts[mode] = counter.get_total_flops()
            del model
        result[shape] = {"sparse_gflops": counts["sparse"] / 1e9, "dense_gflops": counts["dense"] / 1e9,
                         "ratio": counts["sparse"] / counts["dense"]}  # fmt: skip
    return result


def ratios(rows: list[dict]) -> list[dict]:
    """Speed ratios between cases that differ in one option (same run, same machine)."""
    speed = {r["case"]: r["steps_per_s"] for r in rows if "steps_per_s" in r}
    found = []
    for r in rows:
        if "steps_per_s" not in r:
            continue
        case = Case(r["task"], r["shape"], r["mode"], r["precision"], r["compile"], r["checkpointing"])
        pairs = []
        if case.task == "pretrain" and case.mode == "sparse":
            pairs.append(("sparse / dense", Case(**{**asdict(case), "mode": "dense"})))
        if case.precision == "bf16" and not case.compile and not case.checkpointing:
            pairs.append(("bf16 / fp32", Case(**{**asdict(case), "precision": "fp32"})))
        if case.compile:
            pairs.append(("compiled / eager", Case(**{**asdict(case), "compile": False})))
        if case.checkpointing:
            pairs.append(("checkpointing / none", Case(**{**asdict(case), "checkpointing": False})))
        for label, other in pairs:
            if other.name in speed:
                found.append(
                    {"ratio": label, "case": case.name, "speed_ratio": speed[case.name] / speed[other.name]}
                )
    return found


def print_table(rows: list[dict], found: list[dict]) -> None:
    header = f"{'case':<40}{'ms/step':>10}{'steps/s':>9}{'Mvox/s':>9}{'peak MiB':>10}{'warmup s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<40}  {r['error'][:90]}")
            continue
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        print(f"{r['case']:<40}{r['ms_per_step']:>10.1f}{r['steps_per_s']:>9.2f}"
              f"{r['voxels_per_s'] / 1e6:>9.2f}{peak:>10}{r['warmup_s']:>10.1f}")  # fmt: skip
    for f in found:
        print(f"{f['ratio']:<22}{f['case']:<40}{f['speed_ratio']:.2f}x")


def markdown_report(result: dict, command: str) -> str:
    """The run as a section for benchmarks/RESULTS.md: machine, date, command, cases and ratios."""
    info = result["info"]
    lines = [
        f"### {info['gpu']} (torch {info.get('torch', '?')}, Triton {info.get('triton', '?')}), "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        f"`{command}`; {result.get('elapsed_s', 0):.0f} s in all.",
        "",
        "| case | ms / step | steps/s | Mvoxels/s | peak MiB | warm-up s (3 steps) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        if "error" in r:  # one table cell: no line breaks or column bars
            message = " ".join(r["error"].split()).replace("|", "/")[:120]
            lines.append(f"| {r['case']} | {message} | | | | |")
            continue
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        lines.append(f"| {r['case']} | {r['ms_per_step']:.1f} | {r['steps_per_s']:.2f} | "
                     f"{r['voxels_per_s'] / 1e6:.2f} | {peak} | {r['warmup_s']:.1f} |")  # fmt: skip
    lines += ["", "| ratio | case | speed ratio |", "|---|---|---|"]
    lines += [f"| {f['ratio']} | {f['case']} | {f['speed_ratio']:.2f}x |" for f in result.get("ratios", [])]
    flops = result.get("encoder_flops", {})
    counted = [
        f"{shape} {v['dense_gflops']:.1f} -> {v['sparse_gflops']:.1f} GFLOPs ({v['ratio']:.3f})"
        for shape, v in flops.items()
        if isinstance(v, dict)
    ]
    if counted:
        lines += ["", "Counted encoder forward FLOPs, dense -> sparse: " + "; ".join(counted) + "."]
    return "\n".join(lines) + "\n"


def out_of_budget(signum: int, frame: object) -> None:
    raise TimeoutError("out of budget (--budget-s)")


def environment(device: torch.device, mode: str) -> dict:
    """The GPU and versions (``maeformer info``'s report) and what this run measured."""
    info = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
    }
    info.update(environment_report())
    info["mode"] = mode
    return info


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".", help="folder (or .json path) for training.json")
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="stop starting cases after this many seconds"
    )
    parser.add_argument("--cpu", action="store_true", help="the small shape on CPU, eager vs compiled")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.cpu_smoke:  # no C++ toolchain needed for the smoke check
        mode, shapes, cases, backend, seconds = "cpu-smoke", SMOKE_SHAPES, plan_cases(), "aot_eager", 0.5
    elif args.cpu:
        mode, shapes, cases, backend, seconds = "cpu", CPU_SHAPES, plan_cpu_cases(), "inductor", 8.0
    elif torch.cuda.is_available():
        mode, shapes, cases, backend, seconds = "cuda", SHAPES, plan_cases(), "inductor", 1.5
    else:
        print("no CUDA device: run with --cpu or --cpu-smoke", file=sys.stderr)
        return 2
    device = torch.device("cuda" if mode == "cuda" else "cpu")
    result: dict = {"info": environment(device, mode), "budget_s": args.budget_s}
    print(json.dumps(result["info"]))
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / "training.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    command = "python benchmarks/gpu_training.py " + " ".join(sys.argv[1:])

    def save() -> None:  # after every case: a run killed at its time limit still leaves its results
        result["elapsed_s"] = time.perf_counter() - started
        result["ratios"] = ratios(result.get("cases", []))
        path.write_text(json.dumps(result, indent=2))
        path.with_suffix(".md").write_text(markdown_report(result, command))

    try:
        result["encoder_flops"] = encoder_flops(shapes, device)
    except Exception as exc:  # recorded, the run goes on
        result["encoder_flops"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print("encoder flops", json.dumps(result["encoder_flops"]))
    rows: list[dict] = []
    result["cases"] = rows
    signal.signal(signal.SIGALRM, out_of_budget)
    for case in cases:
        left = args.budget_s - (time.perf_counter() - started)
        if left < (COMPILE_MIN_BUDGET_S if case.compile else 3 * seconds):
            rows.append({"case": case.name, **asdict(case), "error": f"skipped: {left:.0f} s of budget left"})
            continue
        # A compile cannot be cut short from outside: an alarm at the end of the budget raises inside
        # it, the blocks fall back to eager and the case is recorded as failed.
        signal.setitimer(signal.ITIMER_REAL, max(left - 1.0, 1.0))
        try:
            rows.append(run_case(case, shapes, device, backend, min(seconds, left / 4)))
        except Exception as exc:  # recorded, the run goes on
            rows.append({"case": case.name, **asdict(case), "error": f"{type(exc).__name__}: {exc}"[:500],
                         "traceback": traceback.format_exc(limit=6)})  # fmt: skip
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if case.compile:  # compiled code holds its case's model (guards, constants)
            torch._dynamo.reset()
        with contextlib.suppress(Exception):  # a failed case may leave the allocator full
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "traceback"}), flush=True)
        save()
    save()
    print_table(rows, result["ratios"])
    print(f"wrote {path} and its RESULTS.md section {path.with_suffix('.md')} in "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
