"""Training loops read their losses from the device every few steps, and still catch every NaN."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from maeformer_fast.train import pretrain as pretrain_module
from maeformer_fast.train import runtime
from maeformer_fast.train.finetune import FinetuneConfig, finetune
from maeformer_fast.train.pretrain import PretrainConfig, pretrain
from maeformer_fast.train.runtime import NonFiniteLossError

TINY = {"embed_dim": 8, "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)}
COMMON = dict(batch_size=1, num_workers=0, progress=False, seed=0, model_overrides=TINY)


class LoopScalarReads(TorchDispatchMode):
    """Counts ``.item()``-style reads (``aten::_local_scalar_dense``) made by the training loops'
    own code (the innermost library frame is in train/pretrain.py or train/finetune.py); reads inside
    the CPU optimizer or the CPU attention path are theirs, not the loop's."""

    LOOPS = ("train/pretrain.py", "train/finetune.py")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_local_scalar_dense"):
            ours = [f.filename for f in traceback.extract_stack() if "maeformer_fast" in f.filename]
            self.count += bool(ours) and ours[-1].endswith(self.LOOPS)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted_reads(monkeypatch):
    """The loops' loss reads, counted: a list that grows by one per read."""
    reads: list[int] = []

    def counting(values: torch.Tensor) -> list[float]:
        reads.append(values.numel())
        return values.tolist()

    monkeypatch.setattr(runtime, "read_on_host", counting)
    return reads


def test_losses_are_read_once_per_log_interval(phantom_cache, tmp_path, counted_reads):
    """Six pretraining steps logged every 3 read the device twice (3 losses each) and make no scalar
    read in the loop's own code; six fine-tuning steps validated every 3 read twice too. Mutations
    caught: the loop reading ``mean_loss.item()`` every step (6 scalar reads), and ``read()`` at every
    step (6 reads)."""
    config = PretrainConfig(data=str(phantom_cache), out=str(tmp_path / "pre"), steps=6, log_every=3,
                            checkpoint_every=6, preview_every=1000, **COMMON)  # fmt: skip
    with LoopScalarReads() as scalar_reads:
        result = pretrain(config)
    assert counted_reads == [3, 3] and scalar_reads.count == 0
    assert len(result.losses) == 6 and all(0 < loss < 10 for loss in result.losses)
    counted_reads.clear()
    finetune(FinetuneConfig(data=str(phantom_cache), out=str(tmp_path / "ft"), steps=6, val_every=3,
                            checkpoint_every=6, max_val_cases=1, evaluate_test=False, labeled=2,
                            **COMMON))  # fmt: skip
    assert counted_reads == [3, 3]
    rows = (tmp_path / "ft" / "finetune_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4", "5", "6"]  # every step logged


def test_a_nan_loss_is_reported_with_its_own_step_before_any_checkpoint_holds_it(
    phantom_cache, tmp_path, monkeypatch
):
    """A NaN loss at step 4 (0-based) of 6, read at steps 3 and 6, checkpoints every 3: the error names
    step 4 and its case, and only the step-3 checkpoint exists. Mutations caught: ``read`` checking
    only the newest loss (the error then names step 5, where the broken weights give NaN again), and
    the checkpoint written before the losses are read (step 6's checkpoint exists)."""
    calls = iter(range(1000))
    real_loss = pretrain_module.mae_loss

    def poisoned(*args, **kwargs):
        loss, prediction = real_loss(*args, **kwargs)
        return (loss * float("nan") if next(calls) == 4 else loss), prediction

    monkeypatch.setattr(pretrain_module, "mae_loss", poisoned)
    config = PretrainConfig(data=str(phantom_cache), out=str(tmp_path), steps=6, log_every=3,
                            checkpoint_every=3, preview_every=1000, **COMMON)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4, batch cases: phantom_"):
        pretrain(config)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert saved == ["step-0000003"]
