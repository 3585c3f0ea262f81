"""What clusters do to long runs, injected into real CPU runs: a stop signal (SIGTERM, SIGUSR1, Ctrl-C)
at a step, a second signal while the checkpoint is written, a damaged newest checkpoint, a full disk
while saving, and under torchrun one rank's signal and a SIGKILLed worker. Every run resumes with the
same command line (``--resume auto``) to the weights of an uninterrupted run, bit for bit
(``--deterministic``, one thread per process). Faults come from tests/fault_injection.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch
from safetensors import SafetensorError

import maeformer_fast.train.checkpoint as checkpoint
from maeformer_fast.cli.args import dataclass_from_args
from maeformer_fast.cli.main import build_parser, main
from maeformer_fast.train.checkpoint import CheckpointManager
from maeformer_fast.train.finetune import FinetuneConfig, finetune
from maeformer_fast.train.pretrain import PretrainConfig, PretrainResult, pretrain
from maeformer_fast.weights import load_weights

from .. import fault_injection
from .test_distributed import WORLD, assert_same_weights, final_weights, one_thread_env

STEPS = 6
# The small model on 32^3 crops, one crop per step: ~0.3 s a step on one core.
RUN = ["--crop-size", "32", "32", "32", "--batch-size", "1", "--num-workers", "0", "--steps", str(STEPS),
       "--checkpoint-every", "2", "--preview-every", "1000", "--log-every", "1", "--seed", "0",
       "--no-progress", "--deterministic", "--resume", "auto"]  # fmt: skip


def command(data: Path, out: Path, *extra: str) -> list[str]:
    """The ``maeformer pretrain`` command line of every run here (``--resume auto``: first start and
    every restart alike)."""
    return ["pretrain", "--data", str(data), "--out", str(out), *RUN, *extra]


def rerun(argv: list[str]) -> PretrainResult:
    """``argv`` again, through the command line's parser, in this process (for its result)."""
    return pretrain(dataclass_from_args(PretrainConfig, build_parser().parse_args(argv)))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """As every process here and in the subprocesses: bit-equal runs need the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(phantom_cache, tmp_path_factory) -> Path:
    """The uninterrupted single-process run every resumed one must equal."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    assert main(command(phantom_cache, out)) == 0
    return out


def assert_same_run(out: Path, reference: Path, what: str) -> None:
    """Both runs finished with the same weights (all MAE weights, bit for bit) and encoder."""
    assert (out / "encoder.safetensors").is_file()
    assert_same_weights(final_weights(out), final_weights(reference), what, atol=0)


def test_sigterm_stops_after_a_step_and_the_same_command_finishes_the_run(phantom_cache, reference, tmp_path):
    """SIGTERM from outside once the first checkpoint exists: the run finishes its step, writes a
    checkpoint there (complete, though SIGTERM and SIGINT arrive again while it is written), exits 75
    with one line saying how to continue, and the same command line finishes the run to the
    uninterrupted run's weights. Mutations caught: the scheduler state not loaded in
    ``Optimisation.resume`` (decoder.blocks.layers.0.linear1.bias differs by up to 6.9e-4); AdamW's
    step counts saved as 0 in ``Optimisation.save`` (the same bias, up to 3.4e-4); the handler putting
    back the previous action at the first signal (the second SIGTERM, during the checkpoint, kills the
    process: exit -15)."""
    out = tmp_path / "run"
    argv = command(phantom_cache, out)
    env = {**one_thread_env(), fault_injection.FAULTS_ENV: json.dumps({"during_save": ["SIGTERM", "SIGINT"]})}
    process = subprocess.Popen([sys.executable, fault_injection.__file__, *argv], env=env,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    first, deadline = out / "checkpoints" / "step-0000002", time.time() + 180
    while not first.is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 75, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"maeformer pretrain: stopped by SIGTERM after step (\d) with checkpoint (\S+); "
                         "rerun the same command to continue", message)  # fmt: skip
    assert match, message
    stopped_at = int(match[1])
    assert 2 < stopped_at <= STEPS and Path(match[2]) == out / "checkpoints" / f"step-{stopped_at:07d}"
    CheckpointManager(out / "checkpoints").verify(Path(match[2]))  # every file as its manifest says
    assert not (out / "encoder.safetensors").exists()

    resumed = rerun(argv)
    assert len(resumed.losses) == STEPS - stopped_at  # it continued from the signal's checkpoint
    assert_same_run(out, reference, "resumed after SIGTERM")


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_damaged_newest_checkpoint_is_named_and_the_one_before_is_used(
    phantom_cache, reference, tmp_path, capfd, monkeypatch, damage
):
    """A run stopped by SIGUSR1 after step 4 (checkpoints of steps 2 and 4, exit code 75); then the
    newest checkpoint's weights truncated, or one byte of them changed (same size): the resume
    names the file on stderr, sets the folder aside (kept as it was), continues from the checkpoint
    before and ends at the uninterrupted run's weights. Mutation caught: ``CheckpointManager.verify``
    not comparing the files with the manifest (truncated: the resume fails, "not a readable
    safetensors file"; one byte changed: it resumes from the damaged step 4 without a word)."""
    out = tmp_path / "run"
    argv = command(phantom_cache, out)
    fault_injection.inject({"after_step": 4, "signal": "SIGUSR1"}, monkeypatch.setattr)
    first = rerun(argv)
    monkeypatch.undo()
    assert first.paused and len(first.losses) == 4 and first.interrupted is not None
    assert (first.interrupted.signal, first.interrupted.exit_code) == ("SIGUSR1", 75)
    weights = out / "checkpoints" / "step-0000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2] ^= 0x40
    weights.write_bytes(data)

    resumed = rerun(argv)
    stderr = capfd.readouterr().err
    assert f"damaged checkpoint: {weights}: not a readable weights file" in stderr, stderr
    assert "set aside as step-0000004.damaged; resuming from step-0000002" in stderr, stderr
    assert (out / "checkpoints" / "step-0000004.damaged" / "model.safetensors").read_bytes() == data
    assert len(resumed.losses) == STEPS - 2
    assert_same_run(out, reference, f"resumed past a {damage} checkpoint")


class FullDisk:
    """A file opened for writing that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, handle: BinaryIO, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data: bytes | memoryview) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.handle.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.handle.close()


@pytest.mark.parametrize("where", ["weights", "training state"])
def test_full_disk_while_saving_names_the_folder_and_keeps_the_previous_checkpoint(
    phantom_cache, reference, tmp_path, monkeypatch, where
):
    """ENOSPC in the middle of the second checkpoint (step 4), in the weights (safetensors reports it
    as a SafetensorError whose text holds the OS error) or the training state (torch.save reports it
    as a RuntimeError of its zip writer, raised while handling the OSError): an OSError naming the
    checkpoints folder and the checkpoint left, nothing of step 4 on disk, and the resume continues
    from step 2 to the uninterrupted run's weights. Mutation caught: the unfinished folder not removed
    (``.step-0000004.tmp`` stays beside the checkpoints)."""
    out = tmp_path / "run"
    argv = command(phantom_cache, out)
    saves, real_open, real_save_weights = [], open, checkpoint.save_weights

    def full_disk_weights(path: Path, *args: Any) -> None:
        saves.append(path)
        real_save_weights(path, *args)
        if len(saves) == 2:
            path.write_bytes(path.read_bytes()[:1000])
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')  # fmt: skip

    def full_disk_open(path: str | Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            saves.append(path)
        return FullDisk(handle, 1000) if "w" in mode and len(saves) == 2 else handle

    if where == "weights":
        monkeypatch.setattr(checkpoint, "save_weights", full_disk_weights)
    else:
        monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    with pytest.raises(OSError) as raised:
        rerun(argv)
    assert raised.value.errno == errno.ENOSPC
    assert f"cannot write checkpoint step-0000004 in {out / 'checkpoints'} (No space left on device)" in str(
        raised.value
    )
    assert "the newest checkpoint there is step-0000002" in str(raised.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"

    monkeypatch.undo()
    resumed = rerun(argv)
    assert len(resumed.losses) == STEPS - 2
    assert_same_run(out, reference, f"resumed after a full disk in the {where}")


@pytest.mark.parametrize(
    ("flags", "resume"),
    [([], False), (["--resume"], True), (["--resume", "auto"], "auto"), (["--resume", "--no-resume"], False)],
)
def test_resume_option_keeps_its_old_forms_and_takes_auto(flags, resume):
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", *flags])
    assert args.resume == resume
    assert dataclass_from_args(PretrainConfig, args).resume == resume


def test_settings_of_resume_and_stop_signals_are_checked_before_any_work(phantom_cache, reference, capsys):
    """``--resume auto`` refuses a checkpoint of other settings as ``--resume`` does; an unknown
    ``--resume`` value or stop signal is refused at once."""
    with pytest.raises(ValueError, match=r"other settings \(lr 0.0005 -> 0.001\)"):
        rerun(command(phantom_cache, reference, "--lr", "0.001"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(command(phantom_cache, reference, "--resume", "always"))
    assert "invalid choice: 'always'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'BOGUS' is not a signal a run can catch"):
        PretrainConfig(data="d", out="o", stop_signals="TERM,BOGUS")
    with pytest.raises(ValueError, match="'KILL' is not a signal a run can catch"):
        PretrainConfig(data="d", out="o", stop_signals="KILL")
    assert PretrainConfig(data="d", out="o", stop_signals="none").stop_signals == "none"


def test_ctrl_c_stops_finetuning_after_its_step_and_the_rerun_equals_an_uninterrupted_run(
    phantom_cache, tmp_path, monkeypatch
):
    """SIGINT after fine-tuning step 3 (no validation or checkpoint due there): a checkpoint at step 3,
    exit code 130, nothing scored, the signal handlers given back; the rerun equals an uninterrupted
    run (validation curve, best step, both model files). Mutation caught: no forced checkpoint at the
    stop step (``or stopping`` dropped from ``save_now`` in ``finetune``: the loop's ``continue`` skips
    the stop, and the run goes on to step 4, validates and stops there)."""
    settings = dict(data=str(phantom_cache), steps=4, batch_size=1, crop_size=(32, 32, 32), num_workers=0,
                    progress=False, checkpoint_every=2, val_every=2, max_val_cases=1, evaluate_test=False,
                    deterministic=True, resume="auto",
                    model_overrides={"embed_dim": 8, "num_heads": (1, 1, 2, 2)})  # fmt: skip
    straight = finetune(FinetuneConfig(out=str(tmp_path / "straight"), **settings))
    config = FinetuneConfig(out=str(tmp_path / "run"), **settings)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    fault_injection.inject({"after_step": 3, "signal": "SIGINT"}, monkeypatch.setattr)
    stopped = finetune(config)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert stopped.paused and stopped.test_dice is None and stopped.curve == straight.curve[:1]
    assert stopped.interrupted is not None and stopped.interrupted.exit_code == 130
    assert stopped.interrupted.checkpoint == tmp_path / "run" / "checkpoints" / "step-0000003"
    assert stopped.interrupted.checkpoint.is_dir() and not (tmp_path / "run" / "last.safetensors").exists()

    monkeypatch.undo()
    resumed = finetune(config)
    assert resumed.interrupted is None and resumed.curve == straight.curve
    assert resumed.best_step == straight.best_step
    for name in ("last.safetensors", "model.safetensors"):
        expected, _ = load_weights(straight.out / name)
        for key, value in load_weights(resumed.out / name)[0].items():
            assert torch.equal(value, expected[key]), f"{name} {key}"


def torchrun_faults(argv: list[str], faults: dict, max_restarts: int = 0) -> subprocess.CompletedProcess:
    """``maeformer`` ``argv`` in WORLD torchrun processes with ``faults`` (tests/fault_injection.py).

    Restarts need a fresh store per attempt, which neither the static rendezvous (``--master-port``)
    nor the c10d one with torch's shared store gives: the restarted ranks then read the dead group's
    addresses (measured: "Gloo connectFullMesh failed ... Connection refused", or a hang, in the
    restart's ``init_process_group``; pytorch/pytorch#135712). Hence ``--standalone`` and
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, as docs/scaling.md says. torchrun runs in its own
    session, so that a timeout kills its workers too.
    """
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
              "--max-restarts", str(max_restarts), fault_injection.__file__]  # fmt: skip
    env = {**one_thread_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           fault_injection.FAULTS_ENV: json.dumps(faults)}  # fmt: skip
    process = subprocess.Popen([*launch, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_torchrun_ranks_stop_together_and_a_killed_worker_is_restarted_from_the_checkpoint(
    phantom_cache, tmp_path
):
    """Two ranks under torchrun. (1) SIGTERM reaches rank 1 alone after step 3: both ranks stop after
    step 3 and exit 75, rank 0 having written the checkpoint of step 3. (2) The same command under
    ``--max-restarts 1``, rank 1 SIGKILLed after its second step (step 5): torchrun restarts the
    group, which resumes from step 4 and finishes with the weights of the uninterrupted 2-process run.
    Mutations caught: the stop decision not shared (``StopSignals.requested`` without its all-reduce:
    rank 1 stops after step 3, rank 0 trains on, and the group hangs until the 300 s timeout); a
    restart not resuming (``Optimisation.resume`` ignoring the checkpoints: every run starts at 0)."""
    reference, out, log = tmp_path / "straight", tmp_path / "run", tmp_path / "attempts.jsonl"
    straight = torchrun_faults(command(phantom_cache, reference), {})
    assert straight.returncode == 0, straight.stderr[-4000:]

    stopped = torchrun_faults(command(phantom_cache, out), {"after_step": 3, "rank": 1, "signal": "SIGTERM",
                                                            "log": str(log)})  # fmt: skip
    assert stopped.returncode != 0  # torchrun reports the workers' exit code 75 as a failure
    message = "maeformer pretrain: stopped by SIGTERM after step 3"
    assert stopped.stderr.count(message) == 1, stopped.stderr[-4000:]  # rank 0's
    assert "exitcode: 75" in stopped.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step-0000003"

    restarted = torchrun_faults(command(phantom_cache, out), {"after_step": 2, "rank": 1, "signal": "SIGKILL",
                                                              "log": str(log)}, max_restarts=1)  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr[-4000:]
    runs = sorted(tuple(json.loads(line).values()) for line in log.read_text().splitlines())
    assert runs == [(0, 0, 0), (0, 0, 3), (0, 1, 0), (0, 1, 3), (1, 0, 4), (1, 1, 4)]  # attempt, rank, start
    assert_same_run(out, reference, "2 ranks, stopped and restarted")
