"""The table ``maeformer bench`` prints from its rows (``train.bench.bench``)."""

from __future__ import annotations

from collections.abc import Sequence

CASE_LABELS = {"sparse": "pretrain sparse", "dense": "pretrain dense", "finetune": "finetune"}

# The table's figures: heading and width.
COLUMNS = (("ms/step", 9), ("steps/s", 9), ("Mvox/s", 8), ("launches", 10), ("kernels", 9), ("GFLOP", 9),
           ("TFLOPS", 9), ("MFU", 7), ("peak MiB", 10), ("warm-up s", 10))  # fmt: skip


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(step: str, mode: str, cells: Sequence[str]) -> str:
    return f"{step:<17}{mode:<10}" + "".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS))


def _setting(row: dict) -> tuple:
    return row["model"], tuple(row["crop"]), row["batch"], row["precision"], row["device"]


def legend(rows: list[dict]) -> list[str]:
    """What the table's launches and MFU columns mean for the device types and peaks of ``rows``."""
    lines = []
    if any(r["device_type"] == "cuda" for r in rows):
        lines.append("launches: host calls launching device work per step (a CUDA-graph replay is one); "
                     "kernels: kernels the GPU ran per step")  # fmt: skip
    if any(r["device_type"] != "cuda" for r in rows):
        lines.append("launches (CPU): aten ops called from Python or autograd per step, the CPU's analogue "
                     "of kernel launches")  # fmt: skip
    lines.append("GFLOP: counted per step (matmul, conv, attention; forward + backward); MFU = GFLOP / time "
                 "/ the device's dense peak for the matmul dtype")  # fmt: skip
    for device, peak in dict.fromkeys((r["device"], r["peak_tflops"]) for r in rows):
        lines.append(
            f"peak of {device}: " + ("unknown, MFU n/a (--peak-tflops)" if peak is None else f"{peak} TFLOPS")
        )
    return lines


def format_row(row: dict) -> str:
    """One table line of a :func:`bench` row."""
    if "ms_per_step" not in row:
        return f"{CASE_LABELS[row['case']]:<17}{row['mode']:<10}" + (
            row.get("skipped") or f"error: {row['error']}"
        )
    cells = [f"{row['ms_per_step']:.1f}", f"{row['steps_per_s']:.2f}", f"{row['voxels_per_s'] / 1e6:.2f}",
             f"{row['launches']:.0f}", _number(row["kernels"], ".0f"), f"{row['flops'] / 1e9:.1f}",
             f"{row['tflops']:.3g}", "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
             _number(row.get("peak_mib"), ".0f"), f"{row['warmup_s']:.1f}"]  # fmt: skip
    note = "  fell back to eager (fell_back in --json)" if "fell_back" in row else ""
    return _line(CASE_LABELS[row["case"]], row["mode"], cells) + note


def speed_ratios(rows: list[dict]) -> str | None:
    """The sparse / dense pretraining speed ratio of each mode with both steps timed, as a line."""
    ms = {(r["case"], r["mode"]): r["ms_per_step"] for r in rows if "ms_per_step" in r}
    timed = [m for m in dict.fromkeys(r["mode"] for r in rows) if {("sparse", m), ("dense", m)} <= ms.keys()]
    ratios = ", ".join(f"{m} {ms['dense', m] / ms['sparse', m]:.2f}x" for m in timed)
    return f"sparse / dense pretraining speed: {ratios}" if timed else None


def format_table(rows: list[dict]) -> list[str]:
    """The table of :func:`bench` rows (of one or several settings): the legend, then per setting a
    heading, one line per (case, mode) and the sparse/dense speed ratios."""
    lines = legend(rows)
    for setting in dict.fromkeys(map(_setting, rows)):
        group = [r for r in rows if _setting(r) == setting]
        model, crop, batch, precision, device = setting
        threads = "" if group[0]["device_type"] == "cuda" else f", torch threads: {group[0]['threads']}"
        lines += [
            "",
            f"{model}, crop {'x'.join(map(str, crop))}, batch {batch}, {precision} on {device}{threads}",
        ]
        lines += [_line("step", "mode", [name for name, _ in COLUMNS]), *map(format_row, group)]
        lines += [line for line in [speed_ratios(group)] if line]
    return lines
