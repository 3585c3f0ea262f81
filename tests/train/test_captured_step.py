"""The captured training step on CUDA: the model and the optimizer step compiled with torch.compile's
mode "reduce-overhead" (replayed as CUDA graphs) train as the eager step does.

CUDA only (skipped elsewhere); run by ``benchmarks/gpu_check.sh``. The CPU side of the same contract
(one graph each, no break, no recompile, eager parameters) is tests/train/test_compile.py, whose cases
and helpers these tests run on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

from maeformer_fast.train.checkpoint import CheckpointManager
from maeformer_fast.train.loop import RunConfig

from .test_compile import (
    assert_parameters_close,
    compile_run,
    pretrain_case,
    small_optimisation,
    step_both,
    train,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

CUDA = torch.device("cuda")
STEPS = 6  # six batches and masks; the first optimizer step is eager (it creates the state)
# As the CPU test of the model compiled with inductor (tests/train/test_compile.py): inductor's fused
# kernels sum in other orders than eager kernels (gradients within ~1e-4 relative there), which moves
# AdamW's normalised update (lr 1e-4 .. 6e-4 per step here) far less than 1e-5, while a learning rate
# one step off, an unclipped step or a replay of stale inputs moves parameters by ~1e-4. Unmeasured on
# a GPU when written (no GPU in that session): widen only to a measured error, with its reason.
RTOL = ATOL = 1e-5


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 without TF32 in matmuls and convolutions: eager and compiled kernels may pick other
    algorithms, and TF32's 10-bit mantissa would turn their difference into a precision question."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_captured_sparse_mae_step_trains_like_eager():
    """Model and optimizer step (clipping, capturable AdamW with tensor learning rates) compiled with
    mode "reduce-overhead", as ``--compile`` runs on one GPU (narrow small config, sparse MAE): six
    steps with six masks and a warmup LR give the eager losses, learning rates and parameters at every
    step (fp32); no CUDA graph is skipped; the replays with new masks give new, finite losses."""
    eager, eager_model, loss_of = pretrain_case("sparse", "adamw", compile_model=False, device=CUDA)
    captured, captured_model, _ = pretrain_case("sparse", "adamw", compile_model=True, device=CUDA)
    group = captured.optimizer.param_groups[0]
    assert group["capturable"] and group["lr"].device.type == "cuda"  # nothing the graph reads on the host
    train_model = compile_run(captured, captured_model, CUDA, compile_mode="reduce-overhead")
    losses = []
    for seed in range(STEPS):
        loss, expected = step_both((captured, train_model), (eager, eager_model), loss_of, seed)
        torch.testing.assert_close(loss, expected, rtol=RTOL, atol=1e-6)
        # the lr tensors the graph reads (Optimisation.lr is computed from the schedule on the host)
        assert [float(g["lr"]) for g in captured.optimizer.param_groups] == pytest.approx(
            [float(g["lr"]) for g in eager.optimizer.param_groups], rel=1e-6
        )
        assert_parameters_close(captured_model, eager_model, seed, rtol=RTOL, atol=ATOL)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == STEPS, losses
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # the model, the optimizer step
    assert not captured.compiled_update.failed and not train_model.failed


def test_float_lr_checkpoint_resumes_into_a_captured_step(tmp_path):
    """A checkpoint of an eager CUDA run (float lrs, AdamW's step counts on the host) resumes into a
    captured run: its own lr tensors stay, the step counts move to the GPU (capturable AdamW reads
    nothing on the host), and the captured steps continue as the uninterrupted eager run."""
    straight = small_optimisation("adamw", tensor_lr=False, device=CUDA)
    train(straight, range(6))
    first = small_optimisation("adamw", tensor_lr=False, device=CUDA)
    train(first, range(3))
    checkpoints = CheckpointManager(tmp_path / "checkpoints")
    first.save(checkpoints, 3, RunConfig(data="", out=str(tmp_path)), {})

    resumed = small_optimisation("adamw", True, "inductor", CUDA, "reduce-overhead")
    own_lrs = [g["lr"] for g in resumed.optimizer.param_groups]
    assert (
        resumed.resume(checkpoints, RunConfig(data="", out=str(tmp_path), compile=True, resume=True))[0] == 3
    )
    groups = resumed.optimizer.param_groups
    assert all(g["lr"] is own and g["capturable"] for g, own in zip(groups, own_lrs))
    steps = [s["step"] for s in resumed.optimizer.state.values()]
    assert steps and all(s.device.type == "cuda" and s.dtype == torch.float32 for s in steps)
    counters.clear()
    train(resumed, range(3, 6))
    assert not resumed.compiled_update.failed and not counters["inductor"]["cudagraph_skips"]
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)
