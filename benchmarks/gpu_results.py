"""Append the step rows of `maeformer bench --json` files to the CSV record of GPU numbers.

    python benchmarks/gpu_results.py --csv $OUT/gpu_results.csv --source gpu_check.sh $OUT/rows.jsonl

The GPU scripts call it at their end with a CSV under $OUT (the device returns only $OUT); the session
then appends those rows to benchmarks/gpu_results.csv, the one machine-readable record of every GPU
number (``--csv benchmarks/gpu_results.csv`` with the fetched rows.jsonl does the same). Rows that
were skipped or failed (no ``ms_per_step``) are left out; the CSV's header is written once.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
from pathlib import Path

FIELDS = ["date", "device", "torch", "triton", "config", "batch", "case", "mode", "precision", "ms_per_step",
          "mfu", "source"]  # fmt: skip


def software() -> tuple[str, str]:
    """(torch version, Triton version or "") of this interpreter."""
    import torch

    try:
        import triton
    except ImportError:
        return torch.__version__, ""
    return torch.__version__, triton.__version__


def csv_rows(
    bench_rows: list[dict], date: str, torch_version: str, triton_version: str, source: str
) -> list[dict]:
    """The CSV rows of measured bench rows: config is the model name and its crop (``synapse 64x128x128``),
    mfu a fraction with 4 digits (empty without a known peak)."""
    rows = []
    for row in bench_rows:
        if "ms_per_step" not in row:
            continue
        mfu = row.get("mfu")
        rows.append({
            "date": date, "device": row["device"], "torch": torch_version, "triton": triton_version,
            "config": f"{row['model']} {'x'.join(map(str, row['crop']))}", "batch": row["batch"],
            "case": row["case"], "mode": row["mode"], "precision": row["precision"],
            "ms_per_step": f"{row['ms_per_step']:.3f}", "mfu": "" if mfu is None else f"{mfu:.4f}",
            "source": source,
        })  # fmt: skip
    return rows


def append(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header where the file is new or empty."""
    new = not path.is_file() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", type=Path, help="`maeformer bench --json` files (JSON lines)")
    parser.add_argument("--csv", type=Path, required=True, help="the CSV to append to")
    parser.add_argument("--source", required=True, help="what measured them (script or command)")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args(argv)
    bench_rows = []
    for path in args.rows:
        if path.is_file():
            bench_rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = csv_rows(bench_rows, args.date, *software(), args.source)
    append(args.csv, rows)
    print(f"{len(rows)} rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
