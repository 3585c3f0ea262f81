"""Pretraining on a fixed sequence of global batches, so that world sizes, batch sizes and gradient
accumulation can be compared through ``pretrain()`` itself.

Global step s trains on samples ``G * s ... G * s + G - 1`` (G = ranks x batch x accumulation) however
they are split: the micro-batch at loader position p of rank r with batch b holds samples
``(p * world_size + r) * b ...``. By default every sample shares one mask. With ``MASK_RANKS`` = R,
the masks are those R ranks draw as real pretraining does (:func:`rank_masks`: seeded by seed, rank
and loader position), whatever the world size of the run: R ranks then get their own masks, and one
process with the global batch gets the same masks, sample for sample. Every mask hides the same number
of units, so the masked-unit loss of the global batch is the mean of its parts' losses either way.
Run as a script (under torchrun), it pretrains with these batches from a JSON object of
``PretrainConfig`` fields given as its first argument; a second argument sets ``MASK_RANKS``.
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
from maeformer_fast.seeds import step_generator

# Draw the masks as this many ranks would (see the module docstring); None: one shared mask.
MASK_RANKS: int | None = None


def sample(index: int, crop: Sequence[int]) -> torch.Tensor:
    """Sample ``index`` of the sequence: a (1, *crop) volume of its own seed."""
    return torch.randn(1, *crop, generator=torch.Generator().manual_seed(index))


def rank_masks(
    seed: int, rank: int, position: int, batch_size: int, mask: tuple[Sequence[int], float]
) -> torch.Tensor:
    """(batch_size, K) visible units of rank ``rank``'s micro-batch at loader ``position``, drawn as
    the pretraining loader draws them (``data.batch.finish_batch``: seeded by seed, rank and step)."""
    generator = step_generator(torch.device("cpu"), seed, rank, position, "mask")
    return random_unit_mask(batch_size, tuple(mask[0]), mask[1], generator)


def fixed_loader(cache_dir: Any, crop_size: Sequence[int], batch_size: int, *, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, mask: tuple[Sequence[int], float] | None = None,
                 seed: int = 0, **_: Any) -> Iterator[dict[str, Any]]:  # fmt: skip
    """``make_loader``'s interface over the fixed sequence (the cache is not read). With ``mask`` =
    (unit grid, ratio), every sample gets one mask of a fixed seed as its ``visible_ids``, or, with
    ``MASK_RANKS`` set, the masks those ranks draw (one micro-batch per rank and position; so no
    gradient accumulation then), this process's share of them."""
    for position in itertools.count(start_step):
        first = (position * world_size + rank) * batch_size
        ids = range(first, first + batch_size)
        batch = {
            "image": torch.stack([sample(i, crop_size) for i in ids]),
            "case_ids": [f"sample-{i}" for i in ids],
        }
        if mask is not None and MASK_RANKS is not None:
            per_rank = batch_size * world_size // MASK_RANKS
            drawn = torch.cat([rank_masks(seed, r, position, per_rank, mask) for r in range(MASK_RANKS)])
            batch["visible_ids"] = drawn[rank * batch_size : (rank + 1) * batch_size]
        elif mask is not None:
            one = random_unit_mask(1, tuple(mask[0]), mask[1], torch.Generator().manual_seed(0))
            batch["visible_ids"] = one.expand(batch_size, -1).contiguous()
        yield batch


PATCHES = [(maeformer_fast.data, "make_loader", fixed_loader)]


if __name__ == "__main__":
    for module, name, replacement in PATCHES:
        setattr(module, name, replacement)
    if len(sys.argv) > 2:
        MASK_RANKS = int(sys.argv[2])
    fields = json.loads(sys.argv[1])  # JSON has no tuples: restore them
    fields["crop_size"] = tuple(fields["crop_size"])
    fields["model_overrides"] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in fields["model_overrides"].items()
    }
    maeformer_fast.train.pretrain.pretrain(maeformer_fast.train.pretrain.PretrainConfig(**fields))
