"""Optional TensorBoard logging of a training run: scalars per step and the PNGs the run writes."""

from __future__ import annotations

import math
from pathlib import Path
from types import TracebackType


class TensorBoardMissingError(ModuleNotFoundError, ValueError):
    """tensorboard is not installed. A ModuleNotFoundError for code that checks for missing packages,
    and a ValueError so that ``maeformer`` prints it as one line with exit code 2, like other options
    the setup cannot honour."""


class TensorBoardLog:
    """A ``SummaryWriter`` on ``folder`` when ``enabled``; when not, every method does nothing, so a
    training loop calls it unconditionally (ranks other than 0 pass ``enabled=False``).

    ``resume_step``: the checkpoint step a resumed run continues from. Events a killed run logged
    after it are hidden (``purge_step``), as CsvLog drops those rows, so the resumed steps are not
    shown twice."""

    def __init__(self, folder: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.writer = None
        if not enabled:
            return
        try:  # here: the package works without tensorboard, which only this option needs
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch's module imports tensorboard first
            import torch

            # The installed torch pinned in the same command, so that pip keeps this build (a CUDA
            # "2.6.0+cu124" satisfies "==2.6.0") and cannot swap it for another.
            pinned = torch.__version__.split("+")[0]
            raise TensorBoardMissingError(
                f'--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]" '
                f"torch=={pinned}",
                name="tensorboard",
            ) from error
        purge_step = None if resume_step is None else resume_step + 1
        # flush_secs: a killed run loses at most 10 s of scalars (the default is 2 minutes)
        self.writer = SummaryWriter(str(folder), purge_step=purge_step, flush_secs=10)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Log each value under its tag (e.g. loss, lr, val_dice, step_time_s) at ``step``; None (not
        measured at this step, like val_dice between validations) and NaN are left out."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, png: Path, step: int) -> None:
        """Log a PNG the run wrote (a reconstruction preview, a segmentation picture) at ``step``."""
        if self.writer is None:
            return
        import matplotlib.image

        pixels = matplotlib.image.imread(png)  # float in [0, 1]: (H, W) gray, (H, W, 3) or RGBA
        if pixels.ndim == 3:
            pixels = pixels[..., :3]  # TensorBoard shows RGB; the previews' alpha is opaque anyway
        self.writer.add_image(tag, pixels, step, dataformats="HWC" if pixels.ndim == 3 else "HW")
        self.writer.flush()  # images are rare and large: on disk now, for a run killed before close

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes
            self.writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
