"""Window attention on a CUDA machine: check the Triton kernels, then time them against their peers.

Shapes are the nnFormer Synapse encoder stages (crop 64x128x128, patch (2, 4, 4), batch 2, head dim 32):

    stage0  32^3 grid, window 4 (64 tokens),   6 heads
    stage1  16^3 grid, window 4,              12 heads
    stage2   8^3 grid, window 8 (global, 512), 24 heads
    stage3   4^3 grid, window 4 (global, 64),  48 heads

each dense and 25%-visible (MAE: a random 25% of the 8x8x8-token units of stage 0 are kept, which are
4^3, 2^3 and 1^3 tokens at the later stages), in bf16 and fp32, forward and forward+backward.

Providers (one failing is recorded and the rest go on):
    triton            the fused kernels (backend="triton")
    torch             groups padded to power-of-two buckets + SDPA (backend="torch")
    sdpa_dense_bias   Swin-style dense windows: tokens scattered into (G, H, W, D) window slots, bias
                      materialised as (G, H, W, W) with -inf for empty slots, SDPA
    flex              FlexAttention, compiled: one packed sequence, block mask "same group", bias
                      from coordinates in score_mod (block mask built outside the timing, its build
                      time recorded; bf16 and stages 0/2 unless --flex-all, compiles are slow)

Run:  python benchmarks/gpu_window_attention.py --out $OUT      (writes $OUT/window_attention.json)
      python benchmarks/gpu_window_attention.py --cpu-smoke     (tiny shapes, Triton interpreter, CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    # The interpreter flag is read when triton's own helpers are decorated: set it before any import.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from maeformer_fast.ops import bias_table_size, varlen_window_attention, window_groups  # noqa: E402
from maeformer_fast.ops.window_groups import relative_position_index
from maeformer_fast.types import as_triple

STAGES = {
    "stage0": {"grid": (32, 32, 32), "window": (4, 4, 4), "heads": 6},
    "stage1": {"grid": (16, 16, 16), "window": (4, 4, 4), "heads": 12},
    "stage2": {"grid": (8, 8, 8), "window": (8, 8, 8), "heads": 24},
    "stage3": {"grid": (4, 4, 4), "window": (4, 4, 4), "heads": 48},
}
HEAD_DIM = 32
BATCH = 2
UNITS = 4  # mask units per axis and sample (8^3 tokens each at stage 0 of a 32^3 grid)
PROVIDERS = ("triton", "torch", "sdpa_dense_bias", "flex")
FLEX_STAGES = ("stage0", "stage2")
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # max error / max |ref|


@dataclass
class Case:
    """Packed tokens of one stage, sorted by window: q, k, v (T, H, D), coords (T, 3), groups."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    coords: torch.Tensor
    cu_seqlens: torch.Tensor
    table: torch.Tensor
    window: tuple[int, int, int]
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.q.shape[0]


def build_case(grid, window, heads, head_dim, batch, visible, units, dtype, device, seed=0, name="") -> Case:
    """Tokens of a ``grid`` per sample, keeping a random ``visible`` fraction of units^3 mask units."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.arange(n) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).repeat(batch, 1)
    sample = torch.arange(batch).repeat_interleave(math.prod(grid))
    if visible < 1.0:
        unit = torch.tensor([max(1, g // units) for g in grid])
        unit_id = (coords // unit) @ torch.tensor([units * units, units, 1])
        keep_units = math.ceil(visible * units**3)
        kept = torch.stack([torch.randperm(units**3, generator=gen)[:keep_units] for _ in range(batch)])
        keep = (unit_id[:, None] == kept[sample]).any(1)
        coords, sample = coords[keep], sample[keep]
    order, cu = window_groups(coords, sample, window, 0)
    coords = coords[order]
    t = coords.shape[0]
    q, k, v = (torch.randn(t, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    table = (0.5 * torch.randn(bias_table_size(window), heads, generator=gen)).to(device)
    return Case(name, q, k, v, coords.to(device), cu.to(device), table, as_triple(window))


# ---------------------------------------------------------------------------------------------------
# providers: each returns out (T, H, D) for (q, k, v, table) given the case's fixed layout


def run_backend(backend: str):
    def fn(case: Case, q, k, v, table):
        return varlen_window_attention(
            q, k, v, case.coords, case.cu_seqlens, table, case.window, backend=backend
        )

    return fn


def _dense_layout(case: Case):
    """Slot of every token in (G * W) window slots, the per-window bias rows (W, W) and empty slots."""
    if "dense" not in case.extra:
        w = torch.tensor(case.window, device=case.coords.device)
        cu = case.cu_seqlens.long()
        group = torch.searchsorted(cu[1:], torch.arange(case.tokens, device=cu.device), right=True)
        origin = torch.full((cu.numel() - 1, 3), 2**30, device=cu.device, dtype=torch.long)
        origin = origin.scatter_reduce(0, group[:, None].expand(-1, 3), case.coords.long(), "amin")
        local = case.coords.long() - origin[group]  # [T, 3], each in [0, w)
        slot = group * math.prod(case.window) + (local[:, 0] * w[1] + local[:, 1]) * w[2] + local[:, 2]
        cells = torch.stack(
            torch.meshgrid(*[torch.arange(n, device=cu.device) for n in case.window], indexing="ij"), -1
        ).reshape(-1, 3)
        rows = relative_position_index(cells[:, None, :] - cells[None, :, :], case.window)  # [W, W]
        filled = torch.zeros((cu.numel() - 1) * math.prod(case.window), dtype=torch.bool, device=cu.device)
        filled[slot] = True
        case.extra["dense"] = (slot, rows, filled.view(cu.numel() - 1, -1))
    return case.extra["dense"]


def run_sdpa_dense_bias(case: Case, q, k, v, table):
    slot, rows, filled = _dense_layout(case)
    groups, size = filled.shape
    heads, dim = q.shape[1:]

    def to_windows(x):  # [T, H, D] -> [G, H, W, D], empty slots zero
        dense = x.new_zeros(groups * size, heads, dim).index_copy(0, slot, x)
        return dense.view(groups, size, heads, dim).transpose(1, 2)

    bias = table[rows].permute(2, 0, 1).to(q.dtype)  # [H, W, W]
    bias = bias[None].masked_fill(~filled[:, None, None, :], float("-inf"))  # [G, H, W, W]
    out = F.scaled_dot_product_attention(to_windows(q), to_windows(k), to_windows(v), attn_mask=bias)
    return out.transpose(1, 2).reshape(groups * size, heads, dim)[slot]


def run_naive_matmul_softmax(case: Case, q, k, v, table):
    """The per-window formulation of Swin/nnFormer code: explicit matmul, bias add, softmax, matmul."""
    slot, rows, filled = _dense_layout(case)
    groups, size = filled.shape
    heads, dim = q.shape[1:]

    def to_windows(x):
        return x.new_zeros(groups * size, heads, dim).index_copy(0, slot, x).view(groups, size, heads, dim)

    qw, kw, vw = (to_windows(x).transpose(1, 2) for x in (q, k, v))  # [G, H, W, D]
    logits = qw @ kw.transpose(-1, -2) * dim**-0.5 + table[rows].permute(2, 0, 1).to(q.dtype)
    logits = logits.masked_fill(~filled[:, None, None, :], float("-inf"))
    out = logits.softmax(-1) @ vw
    return out.transpose(1, 2).reshape(groups * size, heads, dim)[slot]


def _flex_parts(case: Case):
    """The compiled flex_attention and the case's block mask (built once, its time recorded)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "flex" not in case.extra:
        cu = case.cu_seqlens.long()
        group = torch.searchsorted(cu[1:], torch.arange(case.tokens, device=cu.device), right=True)

        def same_group(b, h, q_idx, kv_idx):
            return group[q_idx] == group[kv_idx]

        start = time.perf_counter()
        block_mask = create_block_mask(
            same_group, None, None, case.tokens, case.tokens, device=str(cu.device)
        )
        torch.cuda.synchronize()
        case.extra["flex_mask_ms"] = 1e3 * (time.perf_counter() - start)
        case.extra["flex"] = (torch.compile(flex_attention, dynamic=False), block_mask)
    return case.extra["flex"]


def run_flex(case: Case, q, k, v, table):
    compiled, block_mask = _flex_parts(case)
    cz, cy, cx = case.coords.long().unbind(1)
    wz, wy, wx = case.window

    def bias(score, b, h, q_idx, kv_idx):
        rz = cz[q_idx] - cz[kv_idx] + wz - 1
        ry = cy[q_idx] - cy[kv_idx] + wy - 1
        rx = cx[q_idx] - cx[kv_idx] + wx - 1
        return score + table[(rz * (2 * wy - 1) + ry) * (2 * wx - 1) + rx, h].to(score.dtype)

    out = compiled(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        score_mod=bias,
        block_mask=block_mask,
        scale=q.shape[-1] ** -0.5,
    )  # [1, H, T, D]
    return out[0].transpose(0, 1)


RUNNERS = {
    "triton": run_backend("triton"),
    "torch": run_backend("torch"),
    "reference": run_backend("reference"),
    "sdpa_dense_bias": run_sdpa_dense_bias,
    "naive_matmul_softmax": run_naive_matmul_softmax,
    "flex": run_flex,
}


def make_step(provider: str, case: Case, mode: str, table_grad: bool = True):
    """A closure running one forward ("fwd") or forward+backward ("fwd+bwd") of ``provider``;
    ``table_grad=False`` leaves the bias table out of the backward (for peers that cannot)."""
    fn = RUNNERS[provider]
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(case, case.q, case.k, case.v, case.table)

        return step
    leaves = [t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v)]
    table = case.table.detach().clone().requires_grad_(table_grad)
    wanted = [*leaves, table] if table_grad else leaves
    cotangent = torch.randn_like(case.q)

    def step():
        out = fn(case, *leaves, table)
        return torch.autograd.grad(out, wanted, cotangent)

    return step


# ---------------------------------------------------------------------------------------------------
# checks and timing


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def reference_grads(case: Case):
    """fp32 reference output and gradients of (q, k, v, table) for a fixed cotangent."""
    leaves = [t.detach().float().clone().requires_grad_() for t in (case.q, case.k, case.v, case.table)]
    cotangent = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1)).to(case.q.device)
    out = RUNNERS["reference"](case, *leaves)
    return cotangent, out.detach(), torch.autograd.grad(out, leaves, cotangent)


def check_provider(provider: str, case: Case, reference) -> dict:
    """Forward and every gradient of ``provider`` against the fp32 reference on the same inputs."""
    cotangent, ref, ref_grads = reference
    leaves = [t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v, case.table)]
    out = RUNNERS[provider](case, *leaves)
    grads = torch.autograd.grad(out, leaves, cotangent.to(out.dtype))
    errors = {"out": max_rel_error(out, ref)}
    errors.update(
        {name: max_rel_error(g, r) for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads)}
    )
    tol = TOLERANCE[case.q.dtype]
    row = {"provider": provider, "case": case.name, "dtype": str(case.q.dtype), "errors": errors, "tol": tol}
    row["ok"] = all(e <= tol for e in errors.values())
    if provider == "triton":  # bit-reproducible gradients (no atomics)
        again = torch.autograd.grad(RUNNERS[provider](case, *leaves), leaves, cotangent.to(out.dtype))
        row["deterministic"] = all(torch.equal(a, b) for a, b in zip(grads, again))
        row["ok"] = row["ok"] and row["deterministic"]
    return row


def time_ms(step, device: str) -> float:
    """Mean milliseconds per call: triton's do_bench on CUDA (flushes L2 between calls), wall clock on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(step, warmup=25, rep=100))
    step()
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < 0.2:
        step()
        calls += 1
    return 1e3 * (time.perf_counter() - start) / calls


def print_table(rows: list[dict]) -> None:
    header = f"{'case':<22}{'dtype':<10}{'mode':<9}{'provider':<17}{'ms':>10}{'Mtok/s':>10}{'vs torch':>10}"
    print(header)
    print("-" * len(header))
    base = {(r["case"], r["dtype"], r["mode"]): r.get("ms") for r in rows if r["provider"] == "torch"}
    rank = {p: i for i, p in enumerate(PROVIDERS)}
    for r in sorted(rows, key=lambda r: (r["dtype"], r["case"], r["mode"], rank[r["provider"]])):
        if r.get("ms") is None:
            print(
                f"{r['case']:<22}{r['dtype']:<10}{r['mode']:<9}{r['provider']:<17}  {r.get('error', '')[:60]}"
            )
            continue
        ref = base.get((r["case"], r["dtype"], r["mode"]))
        ratio = f"{ref / r['ms']:.2f}x" if ref else "-"
        print(
            f"{r['case']:<22}{r['dtype']:<10}{r['mode']:<9}{r['provider']:<17}{r['ms']:>10.3f}"
            f"{r['tokens_per_s'] / 1e6:>10.2f}{ratio:>10}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=os.environ.get("OUT", "."), help="folder or .json path for the results"
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1"
    )
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop timing after this many seconds")
    parser.add_argument("--flex-all", action="store_true", help="time FlexAttention for every case")
    args = parser.parse_args()
    started = time.perf_counter()

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for a CPU check of the script", file=sys.stderr)
        return 2
    info = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mode": "cpu-smoke (Triton interpreter, tiny shapes)" if smoke else "cuda",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"unavailable: {exc}"
    print(json.dumps(info))

    if smoke:  # tiny: the interpreter runs one program at a time in numpy
        stages = {
            "stage0": {"grid": (8, 8, 8), "window": (4, 4, 4), "heads": 2},
            "stage2": {"grid": (4, 4, 4), "window": (4, 4, 4), "heads": 2},
        }
        dims, batch, dtypes, visibilities = 16, 1, [torch.float32], [1.0, 0.25]
    else:
        stages, dims, batch = STAGES, HEAD_DIM, BATCH
        dtypes, visibilities = [torch.bfloat16, torch.float32], [1.0, 0.25]

    def case_for(stage, visible, dtype):
        spec = stages[stage]
        name = f"{stage}-{'dense' if visible == 1.0 else f'vis{int(visible * 100)}'}"
        return build_case(
            spec["grid"],
            spec["window"],
            spec["heads"],
            dims,
            batch,
            visible,
            UNITS,
            dtype,
            device,
            seed=0,
            name=name,
        )

    checks, timings = [], []
    # 1. correctness of the kernels (and of the peers, so their timings mean something)
    for stage in stages:
        for dtype in dtypes:
            for visible in visibilities:
                case = case_for(stage, visible, dtype)
                try:
                    reference = reference_grads(case)
                except Exception as exc:
                    checks.append(
                        {"provider": "reference", "case": case.name, "ok": False, "error": repr(exc)}
                    )
                    continue
                for provider in ("triton", "torch", "sdpa_dense_bias"):
                    try:
                        checks.append(check_provider(provider, case, reference))
                    except Exception as exc:  # recorded, the run goes on
                        checks.append(
                            {
                                "provider": provider,
                                "case": case.name,
                                "dtype": str(dtype),
                                "ok": False,
                                "error": f"{type(exc).__name__}: {exc}"[:500],
                                "traceback": traceback.format_exc(limit=4),
                            }
                        )
                    print("check", json.dumps({k: v for k, v in checks[-1].items() if k != "traceback"}))
                del case, reference

    # 2. timing: every case with the cheap providers first, then FlexAttention (compiles per shape)
    jobs = [
        (dtype, stage, visible, provider)
        for provider in PROVIDERS
        for dtype in dtypes
        for stage in stages
        for visible in visibilities
    ]
    jobs.sort(key=lambda job: job[3] == "flex")
    cases: dict = {}
    for dtype, stage, visible, provider in jobs:
        key = (dtype, stage, visible)
        if key not in cases:
            cases.clear()  # one case alive at a time: stage 0 in fp32 is a few hundred MiB
            if device == "cuda":
                torch.cuda.empty_cache()
            cases[key] = case_for(stage, visible, dtype)
        case = cases[key]
        for mode in ("fwd", "fwd+bwd"):
            row = {
                "case": case.name,
                "dtype": str(dtype).replace("torch.", ""),
                "mode": mode,
                "provider": provider,
                "tokens": case.tokens,
                "groups": case.cu_seqlens.numel() - 1,
            }
            timings.append(row)
            if time.perf_counter() - started > args.budget_s:
                row["error"] = "skipped: time budget spent"
                continue
            if provider == "flex" and device != "cuda":
                row["error"] = "skipped: FlexAttention is timed on CUDA only (no backward on CPU)"
                continue
            if (
                provider == "flex"
                and not args.flex_all
                and (dtype != torch.bfloat16 or stage not in FLEX_STAGES)
            ):
                row["error"] = f"skipped: flex only for bf16 {'/'.join(FLEX_STAGES)} (use --flex-all)"
                continue
            try:
                try:
                    row["ms"] = time_ms(make_step(provider, case, mode), device)
                except Exception as exc:
                    if provider != "flex" or mode == "fwd":
                        raise
                    # Older FlexAttention cannot differentiate captured buffers: time without dbias.
                    row["note"] = f"no bias-table gradient ({type(exc).__name__})"
                    row["ms"] = time_ms(make_step(provider, case, mode, table_grad=False), device)
                row["tokens_per_s"] = case.tokens / (row["ms"] * 1e-3)
                if provider == "flex":
                    row["block_mask_ms"] = case.extra.get("flex_mask_ms")
            except Exception as exc:  # recorded, the run goes on
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                row["traceback"] = traceback.format_exc(limit=4)

    print()
    print_table(timings)
    failed = [c for c in checks if not c.get("ok")]
    print(
        f"\nchecks: {len(checks) - len(failed)}/{len(checks)} ok; wall {time.perf_counter() - started:.0f} s"
    )
    for c in failed:
        print("FAILED", {k: v for k, v in c.items() if k != "traceback"})
    result = {**info, "checks": checks, "timings": timings, "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / "window_attention.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
