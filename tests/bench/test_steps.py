"""`maeformer bench`: every training step is timed, with finite losses, launches and counted FLOPs; the
launch count, the MFU arithmetic and the peak table against hand-worked cases; the CLI prints the table."""

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from maeformer_fast.bench import metrics as step_metrics
from maeformer_fast.bench import steps as bench_module
from maeformer_fast.bench import table as bench_table
from maeformer_fast.bench.flops import step_flops
from maeformer_fast.bench.steps import bench
from maeformer_fast.cli.main import main

TINY = {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}
CUDA = torch.autograd.DeviceType.CUDA


def test_bench_times_each_training_step():
    rows = bench(crop_size=(32, 32, 32), batch_size=1, seconds=0.0, model_overrides=TINY, device="cpu",
                 modes=["eager", "captured"])  # fmt: skip
    assert [(r["case"], r["mode"]) for r in rows] == [
        ("sparse", "eager"), ("dense", "eager"), ("finetune", "eager"),
        ("sparse", "captured"), ("dense", "captured"), ("finetune", "captured"),
    ]  # fmt: skip
    for r in rows[:3]:
        assert r["steps"] >= 3 and r["ms_per_step"] > 0 and math.isfinite(r["loss"])
        assert r["precision"] == "fp32" and r["launches"] > 0 and r["kernels"] is None
        assert r["flops"] > 0 and r["peak_tflops"] is None and r["mfu"] is None  # the CPU: no known peak
    assert all(r["skipped"] == "n/a: CUDA graphs need a CUDA device" for r in rows[3:])


def test_step_timing_on_a_fake_clock(monkeypatch):
    """Steps of 0.1 s on a clock the test controls, worked out by hand: 2 warm-up steps (0.2 s, not
    timed), then steps until 0.35 s have passed: 4 steps, 100 ms each. Catches warm-up counted in the
    timing (tried: ``time_steps`` timed from the clock's zero) and a miscounted rate (tried:
    ``(steps + 1) / elapsed``)."""
    clock = [0.0]
    monkeypatch.setattr(bench_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def step() -> float:
        clock[0] += 0.1
        return 2.5

    row = bench_module.measure_step(step, 1000, torch.device("cpu"), seconds=0.35, warmup_steps=2)
    assert row["warmup_s"] == pytest.approx(0.2) and row["steps"] == 4 and row["loss"] == 2.5
    assert row["ms_per_step"] == pytest.approx(100) and row["steps_per_s"] == pytest.approx(10)
    assert row["voxels_per_s"] == pytest.approx(10_000)


def test_sparse_dense_speedup_alternates_and_takes_medians(monkeypatch):
    """On a fake clock: sparse steps of 0.1 s, dense steps of 0.3 s, except one dense round slowed to
    0.9 s (a noisy machine): medians 100 and 300 ms, speedup 3. Catches the cases timed one after the
    other instead of alternating (tried: all sparse rounds first; the call order below differs), the
    mean for the median (tried: 500 ms dense, speedup 5) and the ratio inverted (tried: 1/3)."""
    clock, calls = [0.0], []
    monkeypatch.setattr(bench_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    dense_times = iter([0.3, 0.3, 0.3, 0.9, 0.9, 0.3, 0.3])  # warm-up, rounds of 2 steps: the second slow

    def fake_step(task, model, crop, batch, precision, device, mode, overrides):
        def step() -> float:
            calls.append(mode)
            clock[0] += 0.1 if mode == "sparse" else next(dense_times)
            return 1.0

        return step, 0

    monkeypatch.setattr(bench_module, "training_step", fake_step)
    result = bench_module.sparse_dense_speedup("small", (8, 8, 8), 1, torch.device("cpu"), seconds=0.25)
    assert result == pytest.approx({"sparse_ms": 100, "dense_ms": 300, "speedup": 3})
    rounds = [mode for i, mode in enumerate(calls[2:]) if i == 0 or calls[2:][i - 1] != mode]
    assert calls[:2] == ["sparse", "dense"] and rounds == ["sparse", "dense"] * 3


def test_mfu_of_a_hand_worked_matmul():
    """A step of one (1024 x 1024) @ (1024 x 1024) matmul: 2 * 1024^3 = 2,147,483,648 FLOPs (what
    FlopCounterMode counts); at 4 ms per step that is 2^31 / 0.004 s = 0.536870912 TFLOPS, and against a
    2 TFLOPS peak an MFU of 0.268435456. Caught: milliseconds taken as seconds (tried: ``flops /
    ms_per_step``), a peak not in TFLOPS (tried: ``tflops / (peak * 1e12)``)."""
    a = torch.empty(1024, 1024, device="meta")
    with FlopCounterMode(display=False) as counter:
        a @ a
    flops = counter.get_total_flops()
    assert flops == 2 * 1024**3
    found = step_metrics.utilisation(flops, ms_per_step=4.0, peak=2.0)
    assert found["tflops"] == pytest.approx(0.536870912) and found["mfu"] == pytest.approx(0.268435456)
    assert step_metrics.utilisation(flops, 4.0, None)["mfu"] is None


def test_case_flops_count_one_sample_times_the_batch():
    """The counted step FLOPs of a batch of 3 are 3 times one sample's: exactly for the dense steps,
    within 1% for the sparse step (its attention groups vary with the mask). Caught: the batch not
    multiplied in (tried: ``return one``), the dense MAE counted as the sparse one (tried: ``encoder``
    not passed to ``step_flops``)."""
    tiny = {"embed_dim": 8, "num_heads": (1, 1, 2), "depths": (1, 1, 1), "window_sizes": ((4, 4, 4),) * 3}
    crop = (32, 48, 32)
    for case, ratio in (("sparse", 0.75), ("dense", 0.75), ("finetune", None)):
        counted = bench_module.case_flops(case, "small", crop, 3, tiny)
        whole = step_flops("small", tiny, crop, 3, 1, 3, ratio, bench_module.CASES[case][1])
        assert counted == pytest.approx(whole, rel=0.01 if case == "sparse" else 0)
    dense, sparse = (bench_module.case_flops(case, "small", crop, 1, tiny) for case in ("dense", "sparse"))
    assert dense > 1.5 * sparse


def test_cpu_launches_are_the_aten_ops_called_per_step():
    """Hand count of ``(w * 2).sum().backward()``: forward aten::mul and aten::sum; backward the seed
    gradient (aten::ones_like), SumBackward0's aten::expand, MulBackward0's aten::mul and AccumulateGrad's
    aten::detach (it keeps the incoming gradient, detached): 6 ops per step. The ops those call inside
    (aten::to under aten::mul, aten::as_strided under aten::expand, ...) are not counted. Caught: every
    aten event counted (tried: no parent check: 20 per step) and the total not divided by the steps
    (tried: 18)."""
    w = torch.randn(4, requires_grad=True)

    def step() -> float:
        (w * 2).sum().backward()
        w.grad = None
        return 0.0

    step()
    assert step_metrics.count_launches(step, torch.device("cpu"), steps=3) == {"launches": 6, "kernels": None}


def test_cuda_launches_and_kernels_from_profiler_events():
    """Two steps of profiler events as a CUDA run gives them, per step: 3 cudaLaunchKernel, 1
    cuLaunchKernelEx (Triton) and 1 cudaGraphLaunch (a replay of 5 kernels) on the host, with a
    cudaMemcpyAsync and a cudaStreamSynchronize that launch nothing; on the device 4 + 5 kernels, a
    memcpy and a memset. Per step: 5 launches, 9 kernels. Caught: graph replays left out (tried: a
    pattern without GraphLaunch: 4) and copies counted as kernels (tried: no Memcpy/Memset filter: 11)."""
    host = ["cudaLaunchKernel"] * 3 + ["cuLaunchKernelEx", "cudaGraphLaunch", "cudaMemcpyAsync",
                                       "cudaStreamSynchronize", "aten::mm"]  # fmt: skip
    device = ["ampere_sgemm", "triton_poi_fused_0", "vectorized_elementwise_kernel", "reduce_kernel"]
    device += [f"graph_kernel_{i}" for i in range(5)] + ["Memcpy DtoH (Device -> Pinned)", "Memset (Device)"]
    cpu = torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name=n, device_type=cpu, cpu_parent=None) for n in host]
    events += [SimpleNamespace(name=n, device_type=CUDA, cpu_parent=None) for n in device]
    assert step_metrics.launches_in(events * 2, "cuda", steps=2) == {"launches": 5, "kernels": 9}


def test_peaks_from_the_datasheet_table_else_the_users_else_none(monkeypatch):
    """H200 / H100 SXM / A100 from the table; an unknown GPU, an H100 PCIe (lower peak, not in the table)
    and the CPU give None unless ``--peak-tflops`` is given, which always wins; fp32 on CUDA is looked up
    as TF32 only where torch lets matmuls use it. Caught: a substring match (tried: ``"H100" in name``:
    the PCIe part got the SXM peak), the user's peak ignored for known GPUs (tried: the table first),
    and fp32 always taken as TF32 (tried: no precision check)."""
    peak = step_metrics.peak_tflops
    assert peak("NVIDIA H200", "bf16") == 989.4 and peak("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5 and peak("NVIDIA A100 80GB PCIe", "fp16") == 312.0
    for unknown in ("NVIDIA H100 PCIe", "NVIDIA GeForce RTX 4090", "cpu"):
        assert peak(unknown, "bf16") is None and peak(unknown, "bf16", 82.6) == 82.6
    assert peak("NVIDIA H200", "bf16", 500.0) == 500.0
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert (
        step_metrics.matmul_dtype("fp32", cuda) == "fp32"
        and step_metrics.matmul_dtype("bf16", cuda) == "bf16"
    )
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert (
        step_metrics.matmul_dtype("fp32", cuda) == "tf32" and step_metrics.matmul_dtype("fp32", cpu) == "fp32"
    )


def test_modes_compile_as_named_and_a_failing_case_leaves_the_rest(monkeypatch):
    """Each mode reaches ``training_step`` with its own compile settings and warm-up: eager none,
    compiled the whole model in torch.compile's default mode, captured in "reduce-overhead"; the
    defaults add the device's compiled form only where compilation is on. A case that raises becomes an
    ``error`` row and the next case is still timed; a compiler's eager fallback is flagged. Caught:
    compiled in the "auto" mode (tried: it captures on CUDA), the exception escaping (tried: no
    ``except``), a fallback left unflagged (tried: matching only "of the optimizer step") and the
    caught warnings kept from the caller (tried: not passed on)."""
    calls = []

    def fake_step(task, model, crop, batch, precision, device, encoder, overrides, compile_model, **kw):
        calls.append((task, encoder, compile_model, kw["compile_mode"]))
        if encoder == "dense" and compile_model:
            raise RuntimeError("out of memory")
        warned = [not compile_model]

        def step() -> float:  # a compiled model that falls back warns at its first call only
            if not warned[0]:
                warned[0] = True
                warnings.warn("torch.compile of the model failed (E); continuing eagerly", stacklevel=1)
            return 1.0

        return step, 8

    monkeypatch.setattr(bench_module, "training_step", fake_step)
    monkeypatch.setattr(bench_module, "case_flops", lambda *args: 10**9)
    with pytest.warns(UserWarning, match="continuing eagerly"):  # passed on to the caller
        rows = bench(crop_size=(32, 32, 32), batch_size=1, seconds=0.0, device="cpu",
                     modes=["eager", "compiled"], cases=["sparse", "dense"])  # fmt: skip
    assert calls == [("pretrain", "sparse", False, None), ("pretrain", "dense", False, None),
                     ("pretrain", "sparse", True, None), ("pretrain", "dense", True, None)]  # fmt: skip
    assert rows[3]["error"] == "RuntimeError: out of memory" and rows[2]["flops"] == 10**9
    assert "fell_back" not in rows[0] and rows[2]["fell_back"].startswith("torch.compile of the model failed")
    assert bench_table.format_row(rows[2]).endswith("fell back to eager (fell_back in --json)")
    assert bench_module.MODES["captured"] == (True, "reduce-overhead")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench_module.default_modes(cpu, None) == ["eager"] == bench_module.default_modes(cuda, False)
    assert bench_module.default_modes(cpu, True) == ["eager", "compiled"]
    assert bench_module.default_modes(cuda, True) == ["eager", "captured"]


def test_bench_command_prints_the_table_and_the_ratio(capsys, tmp_path):
    """With ``--peak-tflops`` the table has an MFU; each row also goes to ``--json`` as it is measured."""
    rows_file = tmp_path / "rows.jsonl"
    argv = ["bench", "--seconds", "0", "--crop-size", "32", "32", "32", "--batch-size", "1", "--device",
            "cpu", "--cases", "sparse,dense", "--peak-tflops", "0.5", "--json", str(rows_file)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pretrain sparse  eager" in out and "pretrain dense   eager" in out and "finetune" not in out
    assert "sparse / dense pretraining speed: eager " in out and "peak of cpu: 0.5 TFLOPS" in out
    assert "launches (CPU): aten ops called from Python or autograd" in out
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["case"] for r in rows] == ["sparse", "dense"] and all(0 < r["mfu"] < 1 for r in rows)
    assert f"{100 * rows[0]['mfu']:.1f}%" in out
