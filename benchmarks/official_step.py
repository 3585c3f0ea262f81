"""Fine-tuning step of the official nnFormer network against this library's, in one process.

Both networks are built with the official trainer's arguments for one published configuration
(synapse, acdc or tumor), at full size, and run the same step on the same random (B, C, *crop) input:
forward under the run's autocast, the library's fine-tuning loss (``segmentation_loss``: Dice + CE,
deep supervision where the configuration has it), backward, an AdamW step. Rounds alternate which
network goes first, so the machine's drift hits both alike; the median over rounds is reported.

Before timing, the official network's weights are imported into ours with the library's importer
(``maeformer_fast.models.official.load_official``) and both are run in eval mode on one input: the
largest logit difference is printed, and a large one stops the run (the two would not compute the
same function, and the timing would compare different work).

The official code is not part of this repository and never enters it (licence and provenance).
``--official`` names a folder holding the official model file(s) ``nnFormer_<config>.py`` (flat, or
in the repository's ``nnformer/network_architecture/`` layout), extracted outside the repository or
into the ignored ``runs/`` folder::

    git clone https://github.com/282857341/nnFormer /tmp/nnFormer
    mkdir -p runs/official_nnformer
    cp /tmp/nnFormer/nnformer/network_architecture/nnFormer_*.py runs/official_nnformer/

The file is imported by path, with this script's own stand-ins for what it imports from nnU-Net,
timm and einops (see :func:`stub_modules`); nothing else of the official code is needed.

Run::

    OMP_NUM_THREADS=1 python benchmarks/official_step.py --official runs/official_nnformer \
        --device cpu --batch-size 1 --rounds 3
    python benchmarks/official_step.py --official runs/official_nnformer --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from maeformer_fast.device import resolve_precision, use_device
from maeformer_fast.models import NNFormer, get_config
from maeformer_fast.models.official import load_official
from maeformer_fast.train.distributed import DistInfo
from maeformer_fast.train.finetune import segmentation_loss
from maeformer_fast.train.loop import prepare_model

# The official trainers' network arguments (nnFormerTrainerV2_nnformer_<config>.py; crop, channels and
# classes from the published plans), full size.
OFFICIAL_ARGS: dict[str, dict] = {
    "synapse": dict(crop_size=[64, 128, 128], embedding_dim=192, input_channels=1, num_classes=14,
                    depths=[2, 2, 2, 2], num_heads=[6, 12, 24, 48], patch_size=[2, 4, 4],
                    window_size=[4, 4, 8, 4], deep_supervision=True),
    "acdc": dict(crop_size=[14, 160, 160], embedding_dim=96, input_channels=1, num_classes=4,
                 depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], patch_size=[1, 4, 4],
                 window_size=[[3, 5, 5], [3, 5, 5], [7, 10, 10], [3, 5, 5]],
                 down_stride=[[1, 4, 4], [1, 8, 8], [2, 16, 16], [4, 32, 32]], deep_supervision=False),
    "tumor": dict(crop_size=[128, 128, 128], embedding_dim=96, input_channels=4, num_classes=4,
                  depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], patch_size=[4, 4, 4],
                  window_size=[4, 4, 8, 4], deep_supervision=False),
}  # fmt: skip

EXTRACT_HINT = (
    "The official code is not in this repository. Extract its model files outside the repository or "
    "into the ignored runs/ folder, e.g.\n"
    "  git clone https://github.com/282857341/nnFormer /tmp/nnFormer\n"
    "  mkdir -p runs/official_nnformer\n"
    "  cp /tmp/nnFormer/nnformer/network_architecture/nnFormer_*.py runs/official_nnformer/\n"
    "and pass --official runs/official_nnformer"
)
# Largest |official - ours| eval logit, relative to the largest |logit|, that still counts as the same
# function: fp32 on the CPU differs by ~1e-6; TF32 or bf16 inside GPU kernels by ~1e-3.
SAME_FUNCTION_TOLERANCE = 1e-2
NETWORKS = ("official", "ours")


# --- the official file, imported with stand-ins for its imports ------------------------------------


class DropPath(nn.Module):
    """Stochastic depth as timm defines it: in training, each sample's branch is zeroed with
    probability ``drop_prob`` and the kept ones scaled by 1 / (1 - drop_prob); identity in eval."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        per_sample = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * per_sample / keep


def to_3tuple(value: object) -> tuple:
    """timm's helper: a sequence as a tuple, a scalar repeated three times."""
    return tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else (value,) * 3


class SegmentationNetwork(nn.Module):
    """nnU-Net's base class, reduced to the ``nn.Module`` it is: its sliding-window helpers are not
    part of a training step."""


def _unused(name: str) -> Callable:
    """A stand-in for something the official file imports but the network never calls."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise NotImplementedError(f"{name} is a stub in benchmarks/official_step.py")

    return refuse


def _module(name: str, **attributes: object) -> ModuleType:
    """A module (marked as a package, so submodules import from it) holding ``attributes``."""
    module = ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attributes)
    return module


def stub_modules() -> dict[str, ModuleType]:
    """The modules the official network file imports, as this script's stand-ins: nnU-Net's
    ``SegmentationNetwork``, ``InitWeights_He`` and ``softmax_helper``, timm's ``DropPath``,
    ``to_3tuple`` and ``trunc_normal_``, einops' ``rearrange`` (the last three nnU-Net/einops names are
    imported but never called by the network)."""
    return {
        "nnformer": _module("nnformer"),
        "nnformer.utilities": _module("nnformer.utilities"),
        "nnformer.utilities.nd_softmax": _module(
            "nnformer.utilities.nd_softmax", softmax_helper=_unused("softmax_helper")
        ),
        "nnformer.network_architecture": _module("nnformer.network_architecture"),
        "nnformer.network_architecture.initialization": _module(
            "nnformer.network_architecture.initialization", InitWeights_He=_unused("InitWeights_He")
        ),
        "nnformer.network_architecture.neural_network": _module(
            "nnformer.network_architecture.neural_network", SegmentationNetwork=SegmentationNetwork
        ),
        "timm": _module("timm"),
        "timm.models": _module("timm.models"),
        "timm.models.layers": _module(
            "timm.models.layers", DropPath=DropPath, to_3tuple=to_3tuple, trunc_normal_=nn.init.trunc_normal_
        ),
        "einops": _module("einops", rearrange=_unused("einops.rearrange")),
    }


def official_file(folder: Path, name: str) -> Path:
    """``nnFormer_<name>.py`` in ``folder`` (flat or in the official repository's layout)."""
    file = f"nnFormer_{name}.py"
    candidates = [folder / file, folder / "nnformer" / "network_architecture" / file]
    for path in candidates:
        if path.is_file():
            return path
    looked = " and ".join(str(p) for p in candidates)
    raise SystemExit(f"no official nnFormer file for {name!r} (looked for {looked}).\n{EXTRACT_HINT}")


def import_official(folder: Path, name: str) -> ModuleType:
    """The official network file for ``name``, imported by path with :func:`stub_modules` standing in
    for its imports; ``sys.modules`` is restored afterwards (the stubs must not shadow a real timm)."""
    path = official_file(folder, name)
    stubs = stub_modules()
    saved = {key: sys.modules.get(key) for key in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(f"official_nnformer_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for key, previous in saved.items():
            if previous is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = previous
    return module


# --- the two networks --------------------------------------------------------------------------------


def build_networks(folder: Path, name: str, ours_kind: str) -> dict[str, nn.Module]:
    """The official network (trainer arguments, seeded init) and ours: ``imported`` holds the official
    weights through the library's importer (official bias index; ACDC's cyclic windows), ``default`` is
    the library's default config of the same name (correct bias index), freshly initialised."""
    module = import_official(folder, name)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # the official bias index's torch.meshgrid without indexing=
        warnings.filterwarnings("ignore", message="torch.meshgrid")
        official = module.nnFormer(**OFFICIAL_ARGS[name])
    if ours_kind == "imported":
        ours = load_official(official.state_dict(), name)
    else:
        ours = NNFormer(get_config(name))
    networks = {"official": official, "ours": ours}
    count = {key: sum(p.numel() for p in net.parameters()) for key, net in networks.items()}
    if count["official"] != count["ours"]:
        raise SystemExit(f"parameter counts differ: {count}; not the same network")
    return networks


def full_resolution(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The full-resolution logits of a network output (the first of a deep-supervision list)."""
    return output[0] if isinstance(output, list | tuple) else output


@torch.no_grad()
def logits_difference(networks: dict[str, nn.Module], name: str, device: torch.device) -> dict[str, float]:
    """Largest |official - ours| of eval-mode fp32 logits on one random input, and the largest |logit|
    for scale; TF32 is off meanwhile so that cuBLAS/cuDNN do not blur the comparison."""
    args = OFFICIAL_ARGS[name]
    x = torch.randn(1, args["input_channels"], *args["crop_size"], generator=torch.Generator().manual_seed(1))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        logits = {k: full_resolution(net.eval()(x.to(device))).float() for k, net in networks.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for net in networks.values():
        net.train()
    diff = (logits["official"] - logits["ours"]).abs().max().item()
    return {"max_abs_diff": diff, "max_abs_logit": logits["official"].abs().max().item()}


# --- the step and its timing -------------------------------------------------------------------------


@dataclass
class Timing:
    """One network's measurements: ms per step of each round, resident and peak step memory."""

    params: int
    round_ms: list[float] = field(default_factory=list)
    resident_mib: float | None = None  # weights + AdamW state, CUDA only
    step_peak_mib: float | None = None  # peak above the resident memory during its steps, CUDA only
    last_loss: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.round_ms)


def make_step(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str, device: torch.device
) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    """One fine-tuning step of ``model``: autocast forward, Dice + CE (deep supervision), backward,
    AdamW (torch's default implementation, the same for both networks); the loss comes back unread,
    so that no step waits for the device."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> torch.Tensor:
        loss = segmentation_loss(model, images, labels, precision, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gradients freed between steps, as in training
        return loss.detach()

    return step, optimizer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_mib(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Bytes of the weights and the optimizer state, in MiB."""
    tensors = list(model.parameters()) + [
        value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    ]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def run_round(step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> tuple[float, float]:
    """``steps`` steps: ms per step and the last loss (read once, after the timing)."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    return 1e3 * (time.perf_counter() - started) / steps, loss.item()


def measure(
    steps: dict[str, Callable[[], torch.Tensor]], timings: dict[str, Timing], args: argparse.Namespace,
    device: torch.device,
) -> None:  # fmt: skip
    """Rounds of ``args.steps_per_round`` steps per network, the order swapped every round; on CUDA
    each network's step peak is tracked over its own rounds."""
    for rnd in range(args.rounds):
        order = NETWORKS if rnd % 2 == 0 else NETWORKS[::-1]
        for key in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            ms, loss = run_round(steps[key], args.steps_per_round, device)
            timing = timings[key]
            timing.round_ms.append(ms)
            timing.last_loss = loss
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                timing.step_peak_mib = max(timing.step_peak_mib or 0.0, peak)
            print(f"  round {rnd + 1}/{args.rounds} {key:8s} {ms:10.1f} ms/step  loss {loss:.4f}", flush=True)


def benchmark(args: argparse.Namespace) -> dict:
    """Build, check, warm up and time both networks; the run's numbers as a dict."""
    device = use_device(args.device)
    precision = resolve_precision(args.precision, device)
    name = args.model
    print(f"building the official and our nnFormer-{name} (full size) ...", flush=True)
    networks = build_networks(args.official, name, args.ours)
    networks = {key: net.to(device) for key, net in networks.items()}
    check = logits_difference(networks, name, device) if args.ours == "imported" else None
    if check is not None:
        relative = check["max_abs_diff"] / max(check["max_abs_logit"], 1e-12)
        print(f"logits check (eval, fp32, batch 1): max |official - ours| = {check['max_abs_diff']:.3g}"
              f" (max |logit| {check['max_abs_logit']:.3g})", flush=True)  # fmt: skip
        if relative > SAME_FUNCTION_TOLERANCE:
            raise SystemExit(f"the networks differ (relative {relative:.3g}): not timing unlike work")

    config = OFFICIAL_ARGS[name]
    generator, shape = torch.Generator().manual_seed(2), (args.batch_size, *config["crop_size"])
    images = torch.randn(shape[0], config["input_channels"], *shape[1:], generator=generator)
    labels = torch.randint(0, config["num_classes"], shape, generator=generator)
    images, labels = images.to(device), labels.to(device)
    if args.compile:  # ours only: the official code runs as it is
        networks["ours"] = prepare_model(networks["ours"], DistInfo(), device, compile_model=True)
    steps, optimizers, timings = {}, {}, {}
    for key, net in networks.items():
        steps[key], optimizers[key] = make_step(net, images, labels, precision, device)
        timings[key] = Timing(params=sum(p.numel() for p in net.parameters()))
    warmup = args.warmup if args.warmup is not None else (5 if args.compile else 1)
    for key in NETWORKS:
        print(f"warm-up: {warmup} step(s) of {key} ...", flush=True)
        started = time.perf_counter()
        run_round(steps[key], warmup, device)
        print(f"  {time.perf_counter() - started:.1f} s", flush=True)
        if device.type == "cuda":
            timings[key].resident_mib = resident_mib(networks[key], optimizers[key])
    measure(steps, timings, args, device)
    return report(args, device, precision, check, timings, warmup)


# --- reporting ---------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def report(
    args: argparse.Namespace, device: torch.device, precision: str, check: dict | None,
    timings: dict[str, Timing], warmup: int,
) -> dict:  # fmt: skip
    """The run's numbers (what ``--json`` writes)."""
    return {
        "model": args.model,
        "crop": OFFICIAL_ARGS[args.model]["crop_size"],
        "batch_size": args.batch_size,
        "precision": precision,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ours": args.ours + (" compiled" if args.compile else ""),
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "warmup_steps": warmup,
        "logits_check": check,
        "networks": {k: {**asdict(t), "median_ms": t.median_ms} for k, t in timings.items()},
        "official_over_ours": timings["official"].median_ms / timings["ours"].median_ms,
    }


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def print_table(result: dict) -> None:
    """One table: the run's setting, ms/step per network and the ratio."""
    crop = "x".join(map(str, result["crop"]))
    print(f"\nnnFormer-{result['model']} fine-tuning step, crop {crop}, batch {result['batch_size']}, "
          f"{result['precision']} on {result['device']} ({result['device_name']}), torch {result['torch']}, "
          f"threads {result['threads']}, {result['rounds']} alternating rounds x "
          f"{result['steps_per_round']} step(s), median; ours: {result['ours']}")  # fmt: skip
    if result["logits_check"]:
        print(f"eval logits, max |official - ours|: {result['logits_check']['max_abs_diff']:.3g}")
    columns = ("params", "ms/step", "min", "max", "resident MiB", "step peak MiB")
    print(f"{'network':17s} " + " ".join(f"{c:>14s}" for c in columns))
    for key, row in result["networks"].items():
        label = "official nnFormer" if key == "official" else "maeformer_fast"
        ms = (row["median_ms"], min(row["round_ms"]), max(row["round_ms"]))
        memory = (mib(row["resident_mib"]), mib(row["step_peak_mib"]))
        cells = [f"{row['params']:,d}", *(f"{v:.1f}" for v in ms), *memory]
        print(f"{label:17s} " + " ".join(f"{c:>14s}" for c in cells))
    print(f"official / ours: {result['official_over_ours']:.2f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, help="folder holding the official nnFormer_<model>.py")
    parser.add_argument("--model", choices=sorted(OFFICIAL_ARGS), default="synapse")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on the CPU")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=None, help="default: 2 on CUDA, 1 on the CPU")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=None, help="default: 10 on CUDA, 1 on the CPU")
    parser.add_argument("--warmup", type=int, default=None, help="steps per network first (1; compiled 5)")
    parser.add_argument("--ours", choices=("imported", "default"), default="imported",
                        help="imported: official weights via the library's importer (same function, "
                             "checked); default: the library's default config (true bias index)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="compile ours (the library's prepare_model)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.official is None:
        parser.error(f"--official is required.\n{EXTRACT_HINT}")
    if not args.official.is_dir():
        parser.error(f"--official {args.official}: no such folder.\n{EXTRACT_HINT}")
    on_cuda = use_device(args.device).type == "cuda"
    args.batch_size = args.batch_size or (2 if on_cuda else 1)
    args.steps_per_round = args.steps_per_round or (10 if on_cuda else 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = benchmark(args)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
