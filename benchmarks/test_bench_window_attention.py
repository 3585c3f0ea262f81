"""Varlen window attention throughput on nnFormer Synapse stage-0 shapes, all providers in one run.

Window 4x4x4 (64 tokens), 6 heads, head dim 32; dense and 25%-visible windows (random 25% of mask
units kept, as MAE pretraining sees them); forward and forward+backward. Groups: one per (visibility,
mode), so the ratios between providers read off one table; ``extra_info`` holds tokens/s.

On CPU the grid is 16^3 x batch 2 (8192 tokens dense) with 8^3-token mask units; on CUDA the real
stage 0 (32^3 x batch 2, 65536 tokens). The per-group reference runs on a sixteenth of the tokens
(compare its tokens/s). Triton, FlexAttention and xformers run on CUDA only.

Run: pytest benchmarks/test_bench_window_attention.py --benchmark-only
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from gpu_window_attention import RUNNERS, build_case, make_step

from maeformer_fast.ops.backend import triton_available

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GRID, UNITS = ((32, 32, 32), 4) if CUDA else ((16, 16, 16), 2)
DTYPE = torch.bfloat16 if CUDA else torch.float32
PROVIDERS = ["torch", "reference", "naive_matmul_softmax", "sdpa_dense_bias", "triton", "flex", "xformers"]
ROUNDS = 20 if CUDA else 5


def run_xformers(case, q, k, v, table):
    """xformers memory_efficient_attention on dense windows with a materialised tensor bias."""
    import xformers.ops as xops
    from gpu_window_attention import _dense_layout

    slot, rows, filled = _dense_layout(case)
    groups, size = filled.shape
    heads, dim = q.shape[1:]

    def to_windows(x):  # [G, W, H, D], the layout xformers takes
        return x.new_zeros(groups * size, heads, dim).index_copy(0, slot, x).view(groups, size, heads, dim)

    bias = (
        table[rows].permute(2, 0, 1).to(q.dtype)[None].masked_fill(~filled[:, None, None, :], float("-inf"))
    )
    out = xops.memory_efficient_attention(to_windows(q), to_windows(k), to_windows(v), attn_bias=bias)
    return out.reshape(groups * size, heads, dim)[slot]


def skip_reason(provider: str) -> str | None:
    if provider == "triton" and not (CUDA and triton_available()):
        return "Triton is benchmarked on CUDA only (the CPU interpreter is ~400x slower than eager)"
    if provider == "flex" and not CUDA:
        return "FlexAttention has no CPU backward; benchmarked on CUDA only"
    if provider == "xformers" and (not CUDA or importlib.util.find_spec("xformers") is None):
        return "xformers needs CUDA and the xformers package"
    return None


@pytest.fixture(scope="module", params=[1.0, 0.25], ids=["dense", "vis25"])
def cases(request):
    """The benchmark case and a reduced one (1/16 of the tokens) for the slow per-group reference."""
    small = (GRID[0] // 2, GRID[1] // 2, GRID[2] // 2)
    return request.param, {
        "full": build_case(GRID, (4, 4, 4), 6, 32, 2, request.param, UNITS, DTYPE, DEVICE, seed=0),
        "reduced": build_case(small, (4, 4, 4), 6, 32, 1, request.param, UNITS, DTYPE, DEVICE, seed=0),
    }


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_window_attention(benchmark, cases, provider, mode):
    reason = skip_reason(provider)
    if reason:
        pytest.skip(reason)
    RUNNERS.setdefault("xformers", run_xformers)
    visible, by_size = cases
    case = by_size["reduced" if provider == "reference" else "full"]
    step = make_step(provider, case, mode)
    benchmark.group = f"stage0-{'dense' if visible == 1.0 else 'vis25'}-{mode}"
    benchmark.extra_info.update(tokens=case.tokens, groups=case.cu_seqlens.numel() - 1, dtype=str(DTYPE))

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    rounds = 2 if provider == "reference" else ROUNDS
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info["tokens_per_s"] = case.tokens / benchmark.stats.stats.mean
