"""TensorBoardLog: what it writes is read back with TensorBoard's own reader; disabled, it writes
nothing; without the tensorboard package, it says how to install it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from maeformer_fast.train.tensorboard import TensorBoardLog, TensorBoardMissingError


def read_events(folder: Path):
    """TensorBoard's reader of an event folder, every event kept (its default samples scalars)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()


def scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events.Scalars(tag)]


def red_blue_png(path: Path) -> Path:
    """A 10x12 picture: red left half, blue right half (matplotlib writes it as RGBA)."""
    pixels = np.zeros((10, 12, 3))
    pixels[:, :6, 0] = 1.0
    pixels[:, 6:, 2] = 1.0
    matplotlib.image.imsave(path, pixels)
    return path


def test_scalars_and_image_read_back(tmp_path):
    """Values at their steps exactly (binary fractions: float32 keeps them), None and NaN left out,
    and the picture as RGB of its own size, readable before close. Catches NaN logged (tried: the
    ``isnan`` test removed), the step dropped (tried: ``add_scalar(tag, value)``) and the alpha
    channel kept (tried: no ``[..., :3]``). Not caught: the flush in ``image`` removed (tried), as
    TensorBoard's own local-file writer thread appends each event within milliseconds; the flush
    makes it certain, and makes buffering file systems (TensorFlow's gfile) write it."""
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    with TensorBoardLog(folder, enabled=True) as log:
        log.scalars(1, {"loss": 2.5, "lr": 0.125, "val_dice": None})
        log.scalars(2, {"loss": 1.25, "lr": 0.25, "val_dice": 0.75})
        log.scalars(3, {"loss": 0.5, "lr": 0.25, "val_dice": float("nan")})
        log.image("preview", red_blue_png(tmp_path / "preview.png"), step=3)
        events = read_events(folder)  # the run still open: what a killed run would leave
        assert events.Tags()["images"] == ["preview"]
    events = read_events(folder)
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr", "val_dice"]
    assert scalars(events, "loss") == [(1, 2.5), (2, 1.25), (3, 0.5)]
    assert scalars(events, "lr") == [(1, 0.125), (2, 0.25), (3, 0.25)]
    assert scalars(events, "val_dice") == [(2, 0.75)]
    (image,) = events.Images("preview")
    assert (image.step, image.width, image.height) == (3, 12, 10)
    pixels = matplotlib.image.imread(io.BytesIO(image.encoded_image_string), format="png")
    assert pixels.shape == (10, 12, 3)
    np.testing.assert_array_equal(pixels[:, :6], [[[1.0, 0.0, 0.0]] * 6] * 10)
    np.testing.assert_array_equal(pixels[:, 6:], [[[0.0, 0.0, 1.0]] * 6] * 10)


def test_resumed_run_hides_the_killed_runs_later_steps(tmp_path):
    """A run killed after step 5 and resumed from its step-3 checkpoint shows steps 1-3 of the first
    session and 4-5 of the second, once each. Catches the purge one step off (tried: ``purge_step =
    resume_step``, which hides step 3) and no purge (tried: ``purge_step=None``)."""
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    with TensorBoardLog(folder, enabled=True) as log:
        for step in range(1, 6):
            log.scalars(step, {"loss": float(step)})
    with TensorBoardLog(folder, enabled=True, resume_step=3) as log:
        for step in (4, 5):
            log.scalars(step, {"loss": 10.0 * step})
    assert scalars(read_events(folder), "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_disabled_log_writes_nothing(tmp_path):
    """Disabled (``--tensorboard`` off, or a rank other than 0): no folder, no file, and no PNG read.
    Catches ``enabled`` ignored (tried: the early return removed)."""
    folder = tmp_path / "tb"
    with TensorBoardLog(folder, enabled=False) as log:
        assert not log.enabled
        log.scalars(1, {"loss": 1.0})
        log.image("preview", tmp_path / "missing.png", step=1)
    assert not folder.exists()


def test_missing_tensorboard_says_how_to_install(tmp_path, monkeypatch):
    """Without tensorboard (hidden from import here), construction fails with the install command,
    the installed torch pinned; the error is a ValueError, which ``maeformer`` prints as one line.
    Catches the bare ImportError let through (tried: no ``except``) and a plain ModuleNotFoundError
    (tried: raised instead of TensorBoardMissingError)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # None in sys.modules: import fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an earlier test imported it
    with pytest.raises(ValueError, match=r"--tensorboard needs the tensorboard package") as caught:
        TensorBoardLog(tmp_path / "tb", enabled=True)
    pinned = torch.__version__.split("+")[0]
    assert f'pip install -e ".[tensorboard]" torch=={pinned}' in str(caught.value)
    assert isinstance(caught.value, ModuleNotFoundError) and caught.value.name == "tensorboard"
    assert isinstance(caught.value, TensorBoardMissingError)
    assert not (tmp_path / "tb").exists()
