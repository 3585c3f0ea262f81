"""The ``maeformer`` command line: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .args import add_dataclass_arguments, dataclass_from_args

if TYPE_CHECKING:  # the training modules import torch: the command line loads them when it runs one
    from ..train.preemption import Interruption

PRETRAIN_HELP = {
    "data": "raw dataset folder (Decathlon / nnU-Net v2 layout or a folder of NIfTI volumes), an nnU-Net v2 "
    "preprocessed configuration folder (e.g. $nnUNet_preprocessed/Dataset004_Hippocampus/"
    "nnUNetPlans_3d_fullres) or a preprocessing cache",
    "out": "output folder: encoder.safetensors, checkpoints/, pretrain_log.csv, previews/",
    "model": "model config: small, synapse, acdc, tumor",
    "crop_size": "crop in voxels, a multiple of the mask unit (default: the model config's crop; for an "
    "nnU-Net configuration folder, the plans' patch size rounded up to the mask unit)",
    "mask_ratio": "share of mask units hidden from the encoder",
    "encoder": "sparse = visible tokens only (MAE); dense = SimMIM-style baseline with mask tokens",
    "steps": "optimizer steps of the whole run",
    "warmup_steps": "linear warmup steps (default 5%% of steps)",
    "optimizer": "adamw (betas 0.9, 0.95) or sgd (nesterov momentum 0.99; choose its --lr)",
    "lr": "peak learning rate",
    "norm_pix_loss": "normalise each unit's target voxels (MAE's norm_pix_loss)",
    "loader": "data loader backend: torch or dali",
    "data_on_device": "auto: hold the cache in device memory (on CUDA, else in host memory) when it fits "
    "in half the free memory, else --loader; on: always; off: always --loader",
    "precision": "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "resume": "continue from the newest intact checkpoint in OUT/checkpoints, or start afresh where there is "
    "none: one command line for the first start and every restart (`--resume` alone means the same) "
    "(default: off: a new run, which refuses an earlier run's checkpoints)",
    "stop_signals": "signals that stop the run after the current step with a checkpoint, exit code 75 "
    "(comma-separated, or none); Ctrl-C (SIGINT) always does, with exit code 130",
    "cache_dir": "where to build the preprocessing cache of a raw dataset",
    "model_overrides": "model config fields to change, as JSON, e.g. the study's 3-stage encoder: "
    '\'{"depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_sizes": [[4, 4, 4], [4, 4, 4], [4, 4, 4]]}\'',
    "progress": "show a progress bar",
    "holdout": "a split file (`maeformer finetune`'s OUT/splits.json or `maeformer nnunet-split`'s "
    "splits_final.maeformer.json) whose validation and test cases pretraining leaves out, so that the "
    "scores on them are not of images the encoder saw (default: every case of --data)",
    "deterministic": "use deterministic kernels so that a resumed run is bit-identical (a bit slower)",
    "tensorboard": "also write TensorBoard events to OUT/tensorboard (losses, lr, validation Dice, previews; "
    'needs pip install -e ".[tensorboard]"); the CSV log is written either way',
}


SCALING_HELP = {
    "accumulate_steps": "micro-batches of --batch-size per optimizer step (gradient accumulation; "
    "DDP syncs gradients on the last one only)",
    "activation_checkpointing": "recompute each transformer block's activations in backward: less memory, "
    "more compute",
    "compile": "torch.compile the whole model (default: off until measured faster on the GPU; "
    "falls back to eager with a warning)",
    "cuda_graph": "with --compile on one CUDA GPU: replay the compiled model and optimizer step as CUDA "
    "graphs (mode reduce-overhead); off: compile without CUDA graphs",
}
PRETRAIN_HELP.update(SCALING_HELP)

FINETUNE_HELP = {
    "data": "raw labeled dataset folder (Decathlon layout) or a preprocessing cache",
    "out": "output folder: model.safetensors (best validation), last.safetensors, checkpoints/, logs",
    "init": "encoder.safetensors from `maeformer pretrain` (default: train from scratch)",
    "model": "model config: small, synapse, acdc, tumor (default: with --init the encoder file's settings, "
    "else small)",
    "recipe": "defaults for the optimisation options left unset: mae (lr 3e-3, warmup 1000, layer decay "
    "0.75, encoder frozen 500 steps), scratch (lr 5e-3, warmup 1000) -- the converged hippocampus study's "
    "choices, constant lr with --until-plateau, cosine decay over a fixed --steps -- or none (the "
    "optimizer's defaults); auto: mae with --init, else scratch (default: auto)",
    "steps": "optimizer steps; with --until-plateau the maximum (default: 300, or with --until-plateau "
    "the recipe's maximum: mae 8000, scratch 28000)",
    "until_plateau": "stop when validation Dice has plateaued (no gain above --plateau-min-delta over "
    "--plateau-patience validations, after --plateau-min-steps); the best model is kept",
    "plateau_patience": "validations without a gain before --until-plateau stops",
    "plateau_min_delta": "the smallest validation Dice gain that counts for --until-plateau",
    "plateau_min_steps": "--until-plateau never stops before this step",
    "freeze_encoder_steps": "keep the pretrained encoder's weights fixed for the first N steps "
    "(default: from the recipe)",
    "warmup_steps": "linear warmup steps (default: from the recipe; none: 5%% of steps)",
    "weight_decay": "AdamW/SGD weight decay (default: from the recipe; none: adamw 0.01, sgd 3e-5)",
    "crop_size": "training crop and sliding window in voxels (default: the model config's crop)",
    "labeled": "number of labeled training cases to use (default: the whole training pool)",
    "labeled_fraction": "share of the training pool to use instead of --labeled",
    "seed": "training seed; also picks the labeled subset",
    "split_seed": "seed of the fixed test/validation split (keep it fixed across runs you compare)",
    "optimizer": "adamw (warmup + cosine) or sgd (nesterov 0.99, poly 0.9: the nnU-Net recipe)",
    "lr": "peak learning rate (default: from the recipe, scaled by sqrt(batch / 2); none: adamw 1e-3, "
    "sgd 1e-2)",
    "lr_schedule": "decay: the optimizer's decay over --steps (adamw cosine, sgd poly); constant: warmup, "
    "then the peak lr (for runs a stopping rule ends, where --steps is only a maximum) (default: from "
    "the recipe)",
    "layer_decay": "layer-wise lr decay for the pretrained encoder (1 = off) (default: from the recipe)",
    "val_every": "validate (sliding-window Dice) every N steps",
    "evaluate_test": "score the best model on the test split at the end",
    **{
        k: PRETRAIN_HELP[k]
        for k in ("loader", "precision", "device", "resume", "cache_dir", "progress", "model_overrides")
    },
    "stop_signals": PRETRAIN_HELP["stop_signals"],
    "deterministic": PRETRAIN_HELP["deterministic"],
    "tensorboard": PRETRAIN_HELP["tensorboard"],
    **SCALING_HELP,
    "accumulate_steps": SCALING_HELP["accumulate_steps"]
    + "; the Dice term is a batch Dice per micro-batch and rank",
}


def is_main_process() -> bool:
    """False on torchrun ranks other than 0, which stay quiet."""
    return int(os.environ.get("RANK", "0")) == 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import environment_report

    report = environment_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0


def add_training_arguments(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    """The options of run config ``cls``; ``--resume`` takes an optional ``auto`` (both continue where
    there is a checkpoint and start afresh where there is none; the bare flag predates ``auto``)."""
    add_dataclass_arguments(parser, cls, helps, skip=("resume",))
    parser.add_argument(
        "--resume", nargs="?", const=True, default=False, choices=["auto"], help=helps["resume"]
    )
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="a new run (the default)")


def stopped(command: str, interrupted: Interruption | None, resumes: bool) -> int | None:
    """For a run a signal stopped: its one-line message (from rank 0) and its exit code (75, or 130 for
    Ctrl-C); None for a run that was not stopped."""
    if interrupted is None:
        return None
    if is_main_process():
        print(interrupted.message(command, bool(resumes)), file=sys.stderr)
    return interrupted.exit_code


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..train.pretrain import PretrainConfig, pretrain

    config = dataclass_from_args(PretrainConfig, args)
    result = pretrain(config)
    if (code := stopped("pretrain", result.interrupted, config.resume)) is not None:
        return code
    if not is_main_process():
        return 0
    print(
        f"pretrained {result.steps} steps in {result.wall_time_s:.0f} s, final loss {result.final_loss:.4f}"
    )
    print(f"encoder weights: {result.encoder_path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..train.finetune import FinetuneConfig, finetune
    from .report import report_finetune

    config = dataclass_from_args(FinetuneConfig, args)
    result = finetune(config)
    if (code := stopped("finetune", result.interrupted, config.resume)) is not None:
        return code
    if is_main_process():
        report_finetune(result)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..inference.predict import predict

    files = predict(args.model, args.input, args.out, args.device, args.precision, args.overlap, args.mirror,
                    args.compile, args.png, args.reference)  # fmt: skip
    print(
        f"wrote {len(files)} label maps to {args.out}"
        + (f" and pictures to {args.out}/png" if args.png else "")
    )
    return 0


def cmd_import_official(args: argparse.Namespace) -> int:
    import json

    from ..data.cache import load_plan
    from ..models.official import load_official
    from ..models.pretrained import save_segmenter

    plan = load_plan(args.plan)
    overrides = {"in_channels": plan["num_channels"], "num_classes": plan["num_classes"]}
    model = load_official(args.checkpoint, args.model, **{**overrides, **json.loads(args.overrides)})
    info = {"imported_from": str(args.checkpoint), "official_config": args.model}
    path = save_segmenter(args.out, model, plan, info)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: official nnFormer-{args.model}, {count:,} parameters")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..inference.predict import evaluate, format_table

    result = evaluate(args.pred, args.ref, args.out, args.classes)
    print(format_table(result["summary"]))
    print(f"per-case scores: {Path(args.out or args.pred) / 'scores.csv'}")
    return 0


def cmd_bench_loader(args: argparse.Namespace) -> int:
    """Crops/s of each loader next to the crops/s the sparse pretraining step consumes; which limits."""
    import json

    import torch

    from ..bench.loaders import bench_loaders, limiting_verdict

    if args.data is None:
        raise ValueError("--loader needs --data (a dataset folder or a preprocessing cache)")
    rows = bench_loaders(args.data, args.model, args.crop_size, args.batch_size, args.device,
                         args.precision, args.seconds, args.compile, args.num_workers)  # fmt: skip
    setting = {"model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "num_workers": args.num_workers}  # fmt: skip
    print(f"model {args.model}, batch {args.batch_size}, {setting['threads']} torch threads, "
          f"{args.num_workers} loader workers")  # fmt: skip
    for r in rows:
        print(f"{r['name']:<16}{r['crops_per_s']:>10.1f} crops/s")
    verdict = limiting_verdict(rows)
    print(verdict)
    if args.json:
        with open(args.json, "a") as handle:
            for r in rows:
                handle.write(json.dumps({"bench": "loader", **setting, **r, "verdict": verdict}) + "\n")
    return 0


def comma_list(text: str) -> list[str]:
    """Parse "a,b,c" (an argparse type)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    """Time the training steps on this machine; print the table (launches, MFU, sparse/dense ratio)."""
    import json

    from ..bench.steps import CASES, MODES, bench
    from ..bench.table import format_table

    if args.loader:
        return cmd_bench_loader(args)
    for name, given, known in (("--modes", args.modes or [], MODES), ("--cases", args.cases, CASES)):
        if unknown := [g for g in given if g not in known]:
            raise ValueError(f"{name}: unknown {unknown}; choose from {', '.join(known)}")

    def write(row: dict) -> None:  # each row as soon as measured: a run cut short keeps what it measured
        with open(args.json, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    rows = bench(args.model, args.crop_size, args.batch_size, args.device, args.precision, args.seconds,
                 args.compile, modes=args.modes, cases=args.cases, peak=args.peak_tflops,
                 on_row=write if args.json else None,
                 flops_cache=Path(args.flops_cache) if args.flops_cache else None,
                 count_flops=args.flops)  # fmt: skip
    print("\n".join(format_table(rows)))
    return 1 if any("error" in r for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    from ..train.finetune import FinetuneConfig
    from ..train.pretrain import PretrainConfig
    from .demo import add_demo_command

    parser = argparse.ArgumentParser(
        prog="maeformer",
        description="Visible-token-only MAE pretraining and few-label fine-tuning of nnFormer.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print versions, devices and usable optional backends")
    info.set_defaults(func=cmd_info)

    add_demo_command(sub)

    ben = sub.add_parser(
        "bench", help="training-step speed on this machine: sparse vs dense MAE, fine-tuning"
    )
    ben.add_argument("--model", default="small", help=PRETRAIN_HELP["model"] + " (default: small)")
    ben.add_argument("--crop-size", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                     help="crop in voxels (default: the model config's crop)")  # fmt: skip
    ben.add_argument("--batch-size", type=int, default=2, help="crops per step (default: 2)")
    ben.add_argument("--device", default="auto", help=PRETRAIN_HELP["device"] + " (default: auto)")
    ben.add_argument("--precision", default="auto", help=PRETRAIN_HELP["precision"] + " (default: auto)")
    ben.add_argument("--modes", type=comma_list, default=None,
                     help="comma-separated, of eager (no compilation), compiled (torch.compile of the "
                     "whole model), captured (compiled and replayed as CUDA graphs; CUDA only) (default: "
                     "eager, and the device's compiled form where --compile or the device's default "
                     "compiles)")  # fmt: skip
    ben.add_argument("--cases", type=comma_list, default=["sparse", "dense", "finetune"],
                     help="comma-separated steps to time, of sparse, dense (MAE pretraining), finetune "
                     "(default: all three)")  # fmt: skip
    ben.add_argument("--peak-tflops", type=float, default=None,
                     help="the device's peak TFLOPS for the step's dtype, for MFU on a device the built-in "
                     "table (H100/H200 SXM, A100) lacks (default: the table's, else MFU n/a)")  # fmt: skip
    ben.add_argument("--json", default=None, metavar="PATH",
                     help="also append each row to PATH as a JSON line, when measured")  # fmt: skip
    ben.add_argument("--seconds", type=float, default=5.0,
                     help="timing per case after a warm-up step (default: 5)")  # fmt: skip
    ben.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                     help="count each case's FLOPs for MFU (on the CPU; --no-flops for warm-ups that "
                     "only compile) (default: on)")  # fmt: skip
    ben.add_argument(
        "--flops-cache",
        default=None,
        metavar="PATH",
        help="a JSON file keeping the counted FLOPs per case for later runs (default: none)",
    )
    ben.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the whole model (default: the device's default)")  # fmt: skip
    ben.add_argument("--loader", action="store_true",
                     help="time the data loaders on --data instead: crops/s of each next to the crops/s the "
                     "sparse pretraining step consumes")  # fmt: skip
    ben.add_argument("--data", default=None, help="with --loader: " + PRETRAIN_HELP["data"])
    ben.add_argument(
        "--num-workers", type=int, default=2, help="with --loader: loader worker processes (default: 2)"
    )
    ben.set_defaults(func=cmd_bench)

    pre = sub.add_parser("pretrain", help="MAE pretraining of the nnFormer encoder on unlabeled volumes")
    add_training_arguments(pre, PretrainConfig, PRETRAIN_HELP)
    pre.set_defaults(func=cmd_pretrain)

    fine = sub.add_parser(
        "finetune", help="fine-tune nnFormer segmentation from a pretrained encoder or scratch"
    )
    add_training_arguments(fine, FinetuneConfig, FINETUNE_HELP)
    fine.set_defaults(func=cmd_finetune)

    pred = sub.add_parser("predict", help="segment NIfTI volumes; labels written in each input's geometry")
    pred.add_argument(
        "--model", required=True, help="model.safetensors of `maeformer finetune`, or its output folder"
    )
    pred.add_argument("--input", required=True, help="a NIfTI file or a folder of them")
    pred.add_argument("--out", required=True, help="output folder for <case>.nii.gz label maps")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    pred.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), fp32, bf16, fp16")
    pred.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default: 0.5)")
    pred.add_argument("--mirror", action="store_true", help="average predictions over axis flips (8x slower)")
    pred.add_argument("--png", action="store_true",
                      help="also write OUT/png/<case>.png: slices through the structure, the prediction "
                      "outlined in red (and the --reference in green, with Dice in the title)")  # fmt: skip
    pred.add_argument(
        "--reference", default=None, help="with --png: a folder of reference label maps named like the inputs"
    )
    pred.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                      help="torch.compile the model, one graph per window shape, CUDA graphs on one GPU "
                           "(default: the device's default)")  # fmt: skip
    pred.set_defaults(func=cmd_predict)

    imp = sub.add_parser(
        "import-official",
        help="an official nnFormer checkpoint (.model) as a model file for predict/finetune",
    )
    imp.add_argument(
        "checkpoint", type=Path, help="official checkpoint: nnU-Net v1 .model file or a state dict"
    )
    imp.add_argument("--model", required=True, choices=["synapse", "acdc", "tumor"],
                     help="the published configuration it was trained with")  # fmt: skip
    imp.add_argument("--plan", required=True,
                     help="preprocessing cache (or its plan.json) of the data to predict: spacing, "
                     "normalisation, channels and classes (nnU-Net's own plans are not read)")  # fmt: skip
    imp.add_argument("--out", required=True, type=Path, help="model file to write (.safetensors)")
    imp.add_argument("--overrides", default="{}",
                     help="JSON object of config fields unlike the trainer's (default: {})")  # fmt: skip
    imp.set_defaults(func=cmd_import_official)

    ev = sub.add_parser("evaluate", help="Dice and HD95 per class and case of predicted vs reference labels")
    ev.add_argument("--pred", required=True, help="folder of predicted label maps")
    ev.add_argument("--ref", required=True, help="folder of reference label maps (matched by file name)")
    ev.add_argument("--out", default=None, help="where scores.csv/json go (default: --pred)")
    ev.add_argument(
        "--classes", type=int, nargs="+", default=None, help="labels to score (default: all nonzero found)"
    )
    ev.set_defaults(func=cmd_evaluate)

    from .data import add_commands
    from .nnunet import add_trainer_commands
    from .nnunet_data import register as add_nnunet_commands
    from .report import register as add_report_command
    from .study import add_study_command

    add_commands(sub)
    add_study_command(sub)
    add_report_command(sub)
    add_trainer_commands(sub)
    add_nnunet_commands(sub)  # last: wraps pretrain, finetune and preprocess, registered above
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand. Errors about the user's input (missing or bad files, bad datasets, invalid
    options, unknown names such as a case id the cache lacks, a diverged loss) print one line naming
    the problem and exit 2; ``MAEFORMER_TRACEBACK=1`` re-raises them with the traceback.

    A KeyError counts as such when it was raised with a message (the library's unknown-name errors,
    e.g. "cases not in the cache: [...]"); a bare missing key is a lookup nothing guarded, a bug, and
    keeps its traceback, as do other RuntimeErrors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops at a step itself): no traceback
        if os.environ.get("MAEFORMER_TRACEBACK") == "1":
            raise
        print(f"maeformer {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        from ..data.errors import DatasetError
        from ..train.runtime import NonFiniteLossError

        said = error.args[0] if isinstance(error, KeyError) and error.args else None
        named = isinstance(said, str) and " " in said.strip()
        user_error = named or isinstance(error, (OSError, ValueError, NonFiniteLossError))
        if not user_error or os.environ.get("MAEFORMER_TRACEBACK") == "1":
            raise
        message = str(said) if named else str(error)  # str() of a KeyError is its message's repr
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: its last line says what
            message = "in a data loader worker: " + message.strip().splitlines()[-1]
        elif isinstance(error, DatasetError):  # str() lists every problem, one a line: count, first few
            where = f" in dataset {error.root}" if error.root else ""
            shown, more = error.problems[:3], len(error.problems) - 3
            message = f"{len(error.problems)} problem(s){where}: " + "; ".join(map(str, shown))
            message += f"; {more} more (MAEFORMER_TRACEBACK=1 lists all)" if more > 0 else ""
        # One line whatever the message holds (a path with a newline, a multi-line library message).
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        print(f"maeformer {args.command}: error: {message or type(error).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
