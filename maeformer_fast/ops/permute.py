"""Row permutations that are gathers both ways.

``x[index]`` differentiates through ``index_put`` with accumulate, which on CUDA sorts the indices
and scatters. For a permutation the inverse permutation is known (the plan keeps both), so the
backward can be the gather ``grad[inverse]`` instead: no sort, no atomics, one read and one write.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x[index]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """``x[index]`` for x (T, ...) and a permutation ``index`` (T,) whose inverse is ``inverse``."""
    return _PermuteRows.apply(x, index, inverse)
