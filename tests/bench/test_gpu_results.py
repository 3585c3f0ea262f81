"""benchmarks/gpu_results.py (the CSV record of GPU numbers the GPU scripts append to) on hand-made
bench rows."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_results.py"
spec = importlib.util.spec_from_file_location("gpu_results", SCRIPT)
gpu_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_results)

MEASURED = {"model": "synapse", "crop": [64, 128, 128], "batch": 8, "case": "sparse", "mode": "captured",
            "precision": "bf16", "device": "NVIDIA H200", "ms_per_step": 35.3141,
            "mfu": 0.123456}  # fmt: skip
SETTING = {k: v for k, v in MEASURED.items() if k not in ("ms_per_step", "mfu")}
SKIPPED = {**SETTING, "case": "dense", "mode": "compiled", "skipped": "no compiler"}  # no figures
NO_PEAK = {**MEASURED, "case": "finetune", "batch": 2, "ms_per_step": 70.0, "mfu": None}


def test_rows_appended_once_with_one_header(tmp_path: Path) -> None:
    """Two appends of the same file: one header, the measured rows twice in order, the skipped row never;
    values as written by hand. Mutations caught: the header written at every append (three header rows);
    rows without ``ms_per_step`` kept (a KeyError, or a row with an empty time)."""
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in (MEASURED, SKIPPED, NO_PEAK)))
    table = tmp_path / "out" / "gpu_results.csv"
    for _ in range(2):
        assert gpu_results.main([str(rows_file), "--csv", str(table), "--source", "gpu_check.sh",
                                 "--date", "2026-12-06"]) == 0  # fmt: skip
    lines = table.read_text().splitlines()
    assert lines[0] == ",".join(gpu_results.FIELDS)
    read = list(csv.DictReader(table.open()))
    assert len(read) == 4 and [r["case"] for r in read] == ["sparse", "finetune"] * 2
    first = read[0]
    assert (first["date"], first["device"], first["config"], first["batch"], first["mode"]) == (
        "2026-12-06", "NVIDIA H200", "synapse 64x128x128", "8", "captured")  # fmt: skip
    assert (first["ms_per_step"], first["mfu"], first["precision"], first["source"]) == (
        "35.314", "0.1235", "bf16", "gpu_check.sh")  # fmt: skip
    assert first["torch"] and read[1]["mfu"] == ""
