"""Multi-process training on CPU (gloo): torchrun end to end, DDP against one process, resuming at
another world size, gradient accumulation.

What "the same global batch" means here: rank r of R trains on its own micro-batches; one process
sees all ranks' samples of a step. The MAE loss is a mean over masked units with the same count in
every sample, so R ranks with batch B equal one process with batch R * B. The segmentation loss
holds a batch Dice, which does not decompose over samples: R ranks with batch B equal one process
accumulating R micro-batches of B (each micro-batch its own Dice), which is what is checked.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maeformer_fast.models.config import get_config
from maeformer_fast.train import finetune as ft
from maeformer_fast.train import pretrain as pt
from maeformer_fast.train.distributed import DistInfo, init_distributed
from maeformer_fast.train.loop import Optimisation, prepare_model
from maeformer_fast.weights import load_weights

from .. import fixed_batches as fixed

CPU = torch.device("cpu")
# A narrow model with the small config's structure (4 stages, plain and shifted blocks, skip
# attention); no stochastic depth, whose per-rank seeds would differ from the single process's.
TINY = {"embed_dim": 8, "num_heads": (1, 1, 2, 2), "drop_path_rate": 0.0}
CROP = (32, 32, 32)
STEPS = 3
WORLD = 2


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process training runs single-threaded, like each rank: on a loaded 2-core machine two
    intra-op threads spin-wait for each other (measured 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_port", str(free_port()), "-m", "maeformer_fast.cli", *args]  # fmt: skip
    result = subprocess.run(command, env=one_thread_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


COMMON = ["--crop-size", *map(str, CROP), "--batch-size", "1", "--num-workers", "0", "--no-progress",
          "--checkpoint-every", "2"]  # fmt: skip
# Pretraining on fixed global batches (tests/fixed_batches.py) with momentum SGD and no clipping: the
# weights then follow the gradient's scale (AdamW normalises it away, clipping caps it).
MAE_RUN = dict(model_overrides=TINY, crop_size=CROP, steps=4, warmup_steps=1, num_workers=0, progress=False,
               checkpoint_every=2, optimizer="sgd", lr=0.02, grad_clip=0.0)  # fmt: skip


@pytest.fixture
def fixed_batches(monkeypatch):
    for module, name, replacement in fixed.PATCHES:
        monkeypatch.setattr(module, name, replacement)


def torchrun_pretraining(fields: dict, *script_args: str) -> None:
    """``pretrain()`` on the fixed batches in WORLD torchrun processes (``script_args``: after the
    fields, e.g. ``MASK_RANKS``)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_port", str(free_port()), fixed.__file__, json.dumps(fields),
               *script_args]  # fmt: skip
    result = subprocess.run(command, env=one_thread_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """All MAE weights (encoder and decoder) of a run's newest checkpoint."""
    latest = (out / "checkpoints" / "latest").read_text()
    return load_weights(out / "checkpoints" / latest / "model.safetensors")[0]


def assert_same_weights(actual: dict, expected: dict, what: str, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name], value, rtol=0, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def test_torchrun_pretraining_from_raw_data_equals_one_process_on_the_global_batch(
    phantom_dataset, tmp_path, fixed_batches
):
    """2 ranks x batch 1 under torchrun train the MAE to the weights of 1 process x batch 2 on the same
    global batches, through ``pretrain()``, with momentum SGD and no clipping, so that a gradient of
    another scale shows (AdamW and clipping hide it). Catches gradients summed over ranks instead of
    averaged (tried: each rank's loss times the world size in ``Optimisation.accumulate``)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    torchrun_pretraining({**MAE_RUN, "data": str(phantom_dataset), "cache_dir": str(cache), "out": str(out),
                          "batch_size": 1, "preview_every": 2, "log_every": 1})  # fmt: skip
    assert (cache / "plan.json").is_file()  # built once by rank 0, then read by rank 1
    assert len((out / "pretrain_log.csv").read_text().splitlines()) == 1 + 4  # one writer
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    single = pt.pretrain(
        pt.PretrainConfig(**MAE_RUN, data=str(cache), out=str(tmp_path / "one"), batch_size=2)
    )
    assert_same_weights(final_weights(out), final_weights(single.out), "2 ranks x 1 vs 1 process x 2")

    resumed = pt.pretrain(pt.PretrainConfig(**{**MAE_RUN, "steps": 6}, data=str(cache), out=str(out),
                                            batch_size=1, resume=True))  # fmt: skip
    assert len(resumed.losses) == 2  # steps 5 and 6, from the checkpoint the two ranks wrote
    assert (out / "checkpoints" / "latest").read_text() == "step-0000006"


def test_two_torchrun_agents_train_like_one_process_on_the_global_batch(
    phantom_cache, tmp_path, fixed_batches
):
    """Two nodes, simulated: two torchrun agents of one process each (``--nnodes 2``, c10d rendezvous
    on 127.0.0.1, as on two machines) train the MAE on the fixed batches (batch 1 each) to the weights
    of one process on the global batch of 2, to 1e-6 (momentum SGD, no clipping: a gradient of another
    scale shows), the tolerance of the single-node 2-rank test above. Mutation seen failing: each
    rank's loss times the world size in ``Optimisation.accumulate`` (the gradients summed, not
    averaged)."""
    out = tmp_path / "two_nodes"
    fields = {**MAE_RUN, "data": str(phantom_cache), "out": str(out), "batch_size": 1}
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "two-nodes",
                fixed.__file__,
                json.dumps(fields),
            ],
            env=one_thread_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    logs = [agent.communicate(timeout=240)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    single = pt.pretrain(
        pt.PretrainConfig(**MAE_RUN, data=str(phantom_cache), out=str(tmp_path / "one"), batch_size=2)
    )
    assert_same_weights(final_weights(out), final_weights(single.out), "2 nodes x 1 vs 1 process x 2")


def test_torchrun_pretraining_with_per_rank_masks_equals_one_process_on_the_global_batch(
    phantom_cache, tmp_path, fixed_batches, monkeypatch
):
    """Each of 2 ranks x batch 1 draws its own masks, as pretraining does (seeded by seed, rank and
    loader position: ``fixed_batches.rank_masks``), and they differ at every step; one process x
    batch 2 on the same global batches with the same masks, sample for sample, ends at the same
    weights (momentum SGD, no clipping) to 5e-8. Measured: max |difference| 7.5e-9 over all weights,
    which move by up to 1.8e-3 in the 4 steps; the ranks sharing one mask instead differ by 1.7e-4.
    Mutations seen failing: the MAE loss reading every sample's masked units from the first sample's
    mask (``visible_ids[:1].expand_as(visible_ids)`` in ``forward_loss``: 1.1e-5 apart, where the
    shared-mask test above still matched); ``pretrain`` handing the loader ``rank=0`` (1.6e-5); each
    rank's loss times the world size in ``Optimisation.accumulate`` (3.4e-5). ~15 s."""
    unit_grid = pt.build_mae(pt.PretrainConfig(data="", out="", model_overrides=TINY)).encoder.unit_grid(CROP)
    for step in range(MAE_RUN["steps"]):  # what the ranks draw differs: a per-rank mask is tested
        first, second = (fixed.rank_masks(0, r, step, 1, (unit_grid, 0.75)) for r in range(WORLD))
        assert not torch.equal(first.sort().values, second.sort().values), step
    out = tmp_path / "ranks"
    torchrun_pretraining(
        {**MAE_RUN, "data": str(phantom_cache), "out": str(out), "batch_size": 1}, str(WORLD)
    )
    monkeypatch.setattr(fixed, "MASK_RANKS", WORLD)
    single = pt.pretrain(
        pt.PretrainConfig(**MAE_RUN, data=str(phantom_cache), out=str(tmp_path / "one"), batch_size=2)
    )
    assert_same_weights(final_weights(out), final_weights(single.out), "per-rank masks", atol=5e-8)


def test_torchrun_finetuning_validates_and_tests_on_rank_0(phantom_cache, tmp_path):
    out = tmp_path / "fine"
    result = torchrun("finetune", "--data", str(phantom_cache), "--out", str(out), "--steps", "2",
                      "--val-every", "1", "--max-val-cases", "1", *COMMON)  # fmt: skip
    assert result.stdout.count("test split (2 cases)") == 1  # scored on rank 0, printed by rank 0 only
    rows = (out / "finetune_log.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and all(row.split(",")[3] for row in rows[1:])  # validated at both steps
    for name in ("model.safetensors", "last.safetensors", "test_scores.json", "splits.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"


def segmentation_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step: images (WORLD, 1, *CROP) and labels (WORLD, *CROP) with classes 0..2."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(WORLD, 1, *CROP, generator=generator),
            torch.randint(0, 3, (WORLD, *CROP), generator=generator),
        )
        for _ in range(STEPS)
    ]


def train_segmenter(batches, dist_info: DistInfo, accumulate_steps: int = 1) -> dict[str, torch.Tensor]:
    """Train with the fine-tuning step machinery (Dice + CE with deep supervision; momentum SGD without
    clipping, so the gradient's scale shows in the weights); ``batches`` are this process's samples
    per step, split into ``accumulate_steps`` micro-batches. Returns the final weights."""
    config = ft.FinetuneConfig(data="", out="", steps=STEPS, model_overrides=TINY, optimizer="sgd",
                               grad_clip=0.0, accumulate_steps=accumulate_steps)  # fmt: skip
    torch.manual_seed(0)
    model = ft.NNFormer(get_config("small", **TINY))
    optimisation = ft.build_optimisation(config, model, "fp32", CPU)
    train_model = prepare_model(model, dist_info, CPU)
    for images, labels in batches:
        parts = list(zip(images.chunk(accumulate_steps), labels.chunk(accumulate_steps)))
        optimisation.accumulate(
            train_model, lambda i, p=parts: ft.segmentation_loss(train_model, *p[i], "fp32", CPU)
        )
        optimisation.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ddp_worker(rank: int, port: int, out: str) -> None:
    """One rank: join the gloo group through the torchrun environment, train on this rank's samples."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed(CPU)
    mine = slice(rank, rank + 1)
    segmenter = train_segmenter([(x[mine], y[mine]) for x, y in segmentation_batches()], info)
    torch.save(segmenter, Path(out) / f"rank{rank}.pt")


def test_ddp_segmenter_equals_one_process_accumulating_the_ranks_micro_batches(tmp_path):
    """Catches a gradient of another scale across ranks or micro-batches (tried: each rank's loss
    times the world size; the accumulation's ``/ accumulate_steps`` dropped)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    torch.multiprocessing.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, value in ranks[0].items():  # DDP keeps the replicas identical
        assert torch.equal(value, ranks[1][name]), name
    single = train_segmenter(segmentation_batches(), DistInfo(), accumulate_steps=WORLD)
    assert_same_weights(ranks[0], single, "segmenter, both ranks' micro-batches")
    one_dice = train_segmenter(segmentation_batches(), DistInfo())  # one batch Dice over both samples
    assert any(not torch.allclose(one_dice[k], single[k], rtol=0, atol=1e-6) for k in single)  # 1e-5 apart


def test_accumulating_micro_batches_equals_one_large_batch_through_pretrain(
    phantom_cache, tmp_path, fixed_batches
):
    """2 micro-batches of 1 give the weights of one batch of 2, through ``pretrain()`` with momentum
    SGD and no clipping. Catches the accumulation's missing ``/ accumulate_steps`` (tried in
    ``Optimisation.accumulate``)."""
    runs = {}
    for name, batch, micro in (("whole", 2, 1), ("accumulated", 1, 2)):
        config = pt.PretrainConfig(**MAE_RUN, data=str(phantom_cache), out=str(tmp_path / name),
                                   batch_size=batch, accumulate_steps=micro)  # fmt: skip
        runs[name] = final_weights(pt.pretrain(config).out)
    assert_same_weights(runs["accumulated"], runs["whole"], "accumulate 2 x 1 vs batch 2")


def test_gradient_scaler_unscales_before_clipping():
    """fp16's loss scaling must not change the step: clipping sees true gradients (CPU scaler)."""
    results = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        optimisation = Optimisation(model, optimizer, scheduler, scaler, grad_clip=0.01, accumulate_steps=2)
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
        optimisation.accumulate(model, lambda i, m=model, x=x: m(x[i]).square().sum())
        optimisation.step()
        results.append(model.weight.detach().clone())
    torch.testing.assert_close(results[1], results[0])
    assert not torch.equal(results[0], torch.nn.Linear(4, 2).weight)  # it did step


def linear_optimisation(scaler_enabled: bool, init_scale: float = 2.0**16) -> Optimisation:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=scaler_enabled)
    return Optimisation(model, optimizer, scheduler, scaler)


def test_overflowing_fp16_step_moves_neither_weights_nor_schedule():
    optimisation = linear_optimisation(scaler_enabled=True, init_scale=1e38)  # scaled grads overflow
    model = optimisation.model
    before, lr = model.weight.detach().clone(), optimisation.lr
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(1))
    optimisation.accumulate(model, lambda i: 1e6 * model(x).square().sum())
    optimisation.step()
    assert torch.equal(model.weight, before) and optimisation.lr == lr
    assert optimisation.scaler.get_scale() < 1e38
    optimisation.scaler.update(1.0)  # a scale that fits: the next step updates weights and schedule
    optimisation.accumulate(model, lambda i: model(x).square().sum())
    optimisation.step()
    assert not torch.equal(model.weight, before) and optimisation.lr < lr


def test_fp16_run_resumes_a_checkpoint_saved_without_fp16(tmp_path):
    from maeformer_fast.train.checkpoint import CheckpointManager
    from maeformer_fast.train.loop import RunConfig

    manager = CheckpointManager(tmp_path)
    bf16_run = RunConfig(data="", out="", precision="bf16")
    linear_optimisation(scaler_enabled=False).save(manager, 5, bf16_run, {})
    resumed = linear_optimisation(scaler_enabled=True)
    step, _ = resumed.resume(manager, RunConfig(data="", out="", precision="fp16", resume=True))
    assert step == 5 and resumed.scaler.get_scale() == 2.0**16  # a fresh scale


def test_each_torchrun_process_takes_its_own_gpu(monkeypatch):
    from maeformer_fast.device import pick_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert pick_device("cuda") == torch.device("cuda", 3)  # no GPU needed: nothing is allocated
    assert pick_device("cpu") == CPU
    with pytest.raises(ValueError, match="every process of this machine on one GPU"):
        pick_device("cuda:1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per machine: the index is the user's
    assert pick_device("cuda:1") == torch.device("cuda", 1)
