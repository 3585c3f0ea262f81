"""Forward+backward throughput of the dense nnFormer (tokens/s at the first stage).

Run: pytest benchmarks/test_bench_model.py --benchmark-only
"""

import math

import pytest
import torch

from maeformer_fast.models import NNFormer, get_config

CASES = {
    "small-32x48x32": ("small", {}, (32, 48, 32), 2),
    # Synapse at an eighth of its crop volume: the published model, CPU-sized input.
    "synapse-32x64x64": ("synapse", {}, (32, 64, 64), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dense_forward_backward(benchmark, case):
    name, overrides, crop, batch = CASES[case]
    torch.manual_seed(0)
    config = get_config(name, **overrides)
    model = NNFormer(config).train()
    x = torch.randn(batch, config.in_channels, *crop)

    def step():
        outputs = model(x)
        loss = sum(o.float().mean() for o in (outputs if isinstance(outputs, list) else [outputs]))
        loss.backward()

    step()  # warm-up: allocator and caches
    benchmark.group = "nnformer dense fwd+bwd"
    benchmark.pedantic(step, rounds=3, iterations=1)
    tokens = batch * math.prod(c // p for c, p in zip(crop, config.patch_size))
    benchmark.extra_info["stage0_tokens_per_s"] = tokens / benchmark.stats.stats.mean
    print(f"\n{case}: {tokens / benchmark.stats.stats.mean:,.0f} stage-0 tokens/s (fwd+bwd)")
