"""When validation Dice has stopped improving: the stopping rule of ``finetune --until-plateau`` and of
the converged study (the same function, so a user's run stops where a study arm would)."""

from __future__ import annotations

from dataclasses import dataclass


def plateaued(curve: list[tuple[int, float]], patience: int, min_delta: float, min_steps: int = 0) -> bool:
    """Whether validation Dice has plateaued: the last ``patience`` validations gained no more than
    ``min_delta`` over the best Dice before them, and training has reached ``min_steps``.

    ``curve``: (step, Dice) pairs in step order. E.g. patience 3, min_delta 0.005: Dice 0.10, 0.50,
    0.600, 0.603, 0.604, 0.602 has plateaued (best of the last three 0.604 <= 0.600 + 0.005); ending in
    0.606 instead it has not.
    """
    if len(curve) <= patience or curve[-1][0] < min_steps:
        return False
    before = max(dice for _, dice in curve[:-patience])
    return max(dice for _, dice in curve[-patience:]) <= before + min_delta


@dataclass(frozen=True)
class PlateauRule:
    """:func:`plateaued` with its settings; the defaults are the converged study's (validation every
    100 steps: no gain above 0.005 over 1,000 steps, after at least 1,000 steps)."""

    patience: int = 10
    min_delta: float = 0.005
    min_steps: int = 1000

    def __call__(self, curve: list[tuple[int, float]]) -> bool:
        return plateaued(curve, self.patience, self.min_delta, self.min_steps)
