"""Fine-tuning recipes: what the converged hippocampus study found to work, as ``finetune``'s defaults.

A recipe fills the optimisation settings a run leaves unset (None): with a pretrained encoder
(``init``) the MAE recipe, without one the scratch recipe, or ``none`` for the optimizer's own
defaults (AdamW lr 1e-3, 5% warmup, cosine decay over ``steps``; SGD, which the study did not tune,
always gets these). Every value a run sets itself wins.

Scaled where a run differs from the study's: the peak lr by the square root of the global batch over
the study's 2 (AdamW's usual rule; the study tuned at batch 2 only). The study's constant lr suits runs
a plateau rule stops (``until_plateau``), which keep the best validation model; a fixed budget instead
decays the lr over its steps (cosine after the warmup), and one shorter than four warmups gets a warmup
of a quarter of its steps, with the encoder frozen for the same share of the warmup as in the study
(with a constant lr the demo's 1,000 steps ended at validation Dice 0.761, its best 0.788 at step
500). The crop is not scaled for (the study used the small config's 32x48x32).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

STUDY_BATCH = 2  # samples per optimizer step in the converged study
FIXED_STEPS = 300  # a run's steps when it sets none and does not stop on a plateau
RECIPE_NAMES = ("auto", "mae", "scratch", "none")
STUDY = "results/hippocampus_study_converged/records/README.md"


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings for ``FinetuneConfig``; ``max_steps`` bounds a run that stops on a plateau."""

    lr: float | None  # None: the optimizer's default
    warmup_steps: int | None  # None: 5% of steps
    weight_decay: float | None  # None: the optimizer's default
    layer_decay: float
    freeze_encoder_steps: int
    lr_schedule: str
    max_steps: int
    source: str


RECIPES = {
    "mae": Recipe(3e-3, 1000, 0.01, 0.75, 500, "constant", 8000,
                  f"the converged hippocampus study's choice for an MAE encoder, 8 tuning runs: {STUDY}"),
    # lr 5e-3, not the 2e-2 the study's 11-run scratch search chose on one validation run: over the
    # study's paired scratch arms at 2, 4 and 8 labeled cases 5e-3 had the higher best validation Dice
    # in 9 of 12 (means +0.011, +0.055, +0.072), and 2e-2's validation Dice fell below 0.1 after its
    # warmup in 10 of 17 arms (5e-3's in none); scaled to nnU-Net's batch (3.7e-2) it drove the
    # training loss up.
    "scratch": Recipe(5e-3, 1000, 0.01, 1.0, 0, "constant", 28000,
                      f"the converged hippocampus study's scratch arms, lr 5e-3 over 2e-2: {STUDY}"),
    "none": Recipe(None, None, None, 1.0, 0, "decay", 8000, "the optimizer's defaults, no recipe"),
}  # fmt: skip

RECIPE_FIELDS = ("lr", "warmup_steps", "weight_decay", "layer_decay", "freeze_encoder_steps", "lr_schedule")


def recipe_name(recipe: str, init: str | None, optimizer: str) -> str:
    """The recipe a run uses: ``auto`` is ``mae`` with a pretrained encoder and ``scratch`` without;
    both were tuned for AdamW, so with another optimizer ``auto`` is ``none`` (its own defaults)."""
    if recipe not in RECIPE_NAMES:
        raise ValueError(f"recipe must be one of {RECIPE_NAMES}, got {recipe!r}")
    if optimizer != "adamw":
        if recipe not in ("auto", "none"):
            raise ValueError(
                f"recipe {recipe!r} was tuned for AdamW, not {optimizer!r}: use --recipe none (the "
                f"{optimizer} defaults) or --optimizer adamw"
            )
        return "none"
    if recipe == "auto":
        return "mae" if init else "scratch"
    return recipe


def global_batch(batch_size: int, accumulate_steps: int) -> int:
    """Samples per optimizer step over all ranks (torchrun's WORLD_SIZE, 1 without it)."""
    return batch_size * accumulate_steps * int(os.environ.get("WORLD_SIZE", "1"))


def recipe_values(name: str, steps: int, until_plateau: bool, batch: int) -> dict[str, Any]:
    """The settings recipe ``name`` gives a run of ``steps`` optimizer steps of ``batch`` samples.

    E.g. ``mae`` at batch 8 for a fixed 300 steps: lr 3e-3 * sqrt(8 / 2) = 6e-3, warmup 75, encoder
    frozen for 37 steps (500 / 1000 of the warmup), layer decay 0.75, cosine decay after the warmup.
    """
    recipe = RECIPES[name]
    values = {key: getattr(recipe, key) for key in RECIPE_FIELDS}
    if recipe.lr is not None:
        values["lr"] = recipe.lr * math.sqrt(batch / STUDY_BATCH)
    if not until_plateau:  # a fixed budget: the model of the last steps should be the best one
        values["lr_schedule"] = "decay"
        if recipe.warmup_steps is not None and steps < 4 * recipe.warmup_steps:
            values["warmup_steps"] = max(1, steps // 4)
            values["freeze_encoder_steps"] = (
                recipe.freeze_encoder_steps * values["warmup_steps"] // recipe.warmup_steps
            )
    return values


def describe(name: str, values: dict[str, Any], recipe_given: dict[str, Any], steps: int) -> str:
    """One line for the run's log: the recipe, where it came from, and what the run set otherwise."""
    shown = ", ".join(f"{key} {values[key]:g}" if isinstance(values[key], float) else f"{key} {values[key]}"
                      for key in RECIPE_FIELDS if values[key] is not None)  # fmt: skip
    changed = [
        f"{key} (recipe: {recipe_given[key]})" for key in RECIPE_FIELDS if values[key] != recipe_given[key]
    ]
    text = f"recipe {name} ({RECIPES[name].source}): {shown}; at most {steps} steps"
    return text + (f"; set by the run instead: {', '.join(changed)}" if changed else "")
