"""Pretraining on a fixed sequence of global batches, so that world sizes, batch sizes and gradient
accumulation can be compared through ``pretrain()`` itself.

Global step s trains on samples ``G * s ... G * s + G - 1`` (G = ranks x batch x accumulation) however
they are split: the micro-batch at loader position p of rank r with batch b holds samples
``(p * world_size + r) * b ...``. Every sample shares one mask, so the masked-unit loss of the global
batch is the mean of its parts' losses. Run as a script (under torchrun), it pretrains with these
batches from a JSON object of ``PretrainConfig`` fields given as its one argument.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import maeformer_fast.data
import maeformer_fast.train.pretrain
from maeformer_fast.ops.masking import random_unit_mask


def sample(index: int, crop: Sequence[int]) -> torch.Tensor:
    """Sample ``index`` of the sequence: a (1, *crop) volume of its own seed."""
    return torch.randn(1, *crop, generator=torch.Generator().manual_seed(index))


def fixed_loader(cache_dir: Any, crop_size: Sequence[int], batch_size: int, *, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, mask: tuple[Sequence[int], float] | None = None,
                 **_: Any) -> Iterator[dict[str, Any]]:  # fmt: skip
    """``make_loader``'s interface over the fixed sequence (the cache is not read). With ``mask`` =
    (unit grid, ratio), every sample gets one mask of a fixed seed as its ``visible_ids``."""
    for position in itertools.count(start_step):
        first = (position * world_size + rank) * batch_size
        ids = range(first, first + batch_size)
        batch = {
            "image": torch.stack([sample(i, crop_size) for i in ids]),
            "case_ids": [f"sample-{i}" for i in ids],
        }
        if mask is not None:
            one = random_unit_mask(1, tuple(mask[0]), mask[1], torch.Generator().manual_seed(0))
            batch["visible_ids"] = one.expand(batch_size, -1).contiguous()
        yield batch


PATCHES = [(maeformer_fast.data, "make_loader", fixed_loader)]


if __name__ == "__main__":
    for module, name, replacement in PATCHES:
        setattr(module, name, replacement)
    fields = json.loads(sys.argv[1])  # JSON has no tuples: restore them
    fields["crop_size"] = tuple(fields["crop_size"])
    fields["model_overrides"] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in fields["model_overrides"].items()
    }
    maeformer_fast.train.pretrain.pretrain(maeformer_fast.train.pretrain.PretrainConfig(**fields))
