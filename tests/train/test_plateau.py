"""The plateau rule that ends ``finetune --until-plateau`` runs and the converged study's arms."""

from maeformer_fast.train.plateau import PlateauRule, plateaued


def curve(*dice: float, every: int = 100) -> list[tuple[int, float]]:
    return [(every * (i + 1), d) for i, d in enumerate(dice)]


def test_plateau_criterion_on_hand_worked_curves():
    """Catches a plateau measured against the last Dice before the window instead of the best one
    (tried: ``before = curve[-patience - 1][1]``: the dip-and-recovery curve then counts as progress),
    and a gain of exactly the tolerance's size counted as progress (tried: ``<`` for ``<=``: the
    return to an earlier best with tolerance 0 then counts as progress)."""
    rule = {"patience": 3, "min_delta": 0.005}
    assert plateaued(curve(0.10, 0.50, 0.600, 0.603, 0.604, 0.602), **rule)  # best 0.604 <= 0.600 + 0.005
    assert not plateaued(curve(0.10, 0.50, 0.600, 0.603, 0.604, 0.606), **rule)  # 0.606 > 0.605
    assert plateaued(curve(0.5, 0.7, 0.6, 0.62, 0.64, 0.66), **rule)  # recovering below the earlier best
    assert plateaued(curve(0.5, 0.75, 0.5, 0.5, 0.75), patience=3, min_delta=0.0)  # 0.75 <= 0.75 + 0
    assert not plateaued(curve(0.6, 0.6, 0.6), **rule)  # three validations: nothing before the window
    assert plateaued(curve(0.0, 0.0, 0.0, 0.0), **rule)
    assert not plateaued(curve(0.0, 0.0, 0.0, 0.0), **rule, min_steps=500)  # step 400: too early


def test_patience_counts_exactly_the_last_validations():
    """Catches an off-by-one in the patience window (tried: ``curve[:-patience - 1]`` /
    ``curve[-patience - 1:]``, a window of 4 validations for patience 3: the plateau at 0.6 then still
    counts the 0.5 before it as the best to beat; and ``len(curve) < patience``, which judges three
    validations with nothing before them)."""
    rule = {"patience": 3, "min_delta": 0.0}
    assert not plateaued(curve(0.5, 0.6, 0.6, 0.6), **rule)  # 0.6 beats the 0.5 before the window
    assert plateaued(curve(0.5, 0.6, 0.6, 0.6, 0.6), **rule)  # three validations without gain over 0.6
    assert not plateaued(curve(0.6, 0.6, 0.6), **rule)


def test_rule_defaults_are_the_studys():
    """Catches defaults drifting from the converged study's run.sh (patience 10, min delta 0.005, min
    steps 1000; tried: patience 5): a user's --until-plateau would stop where no study arm did."""
    rule = PlateauRule()
    assert (rule.patience, rule.min_delta, rule.min_steps) == (10, 0.005, 1000)
    rising_then_flat = curve(*([0.1 * i for i in range(1, 8)] + [0.7] * 10))  # steps 100 .. 1,700
    assert rule(rising_then_flat)
    assert not rule(rising_then_flat[:-1])  # nine flat validations: one short of the patience
