"""Fine-tuning's recipes: which preset a run gets, what it sets, what the run's own options override,
and a run that stops on a plateau (with its TensorBoard events)."""

import math

import pytest

from maeformer_fast.cli.args import dataclass_from_args
from maeformer_fast.cli.main import build_parser
from maeformer_fast.models.config import get_config
from maeformer_fast.models.nnformer import NNFormerEncoder
from maeformer_fast.models.pretrained import save_encoder
from maeformer_fast.study.protocol import encoder_overrides
from maeformer_fast.train.finetune import FinetuneConfig, build_optimizer, finetune, segmenter_config

# The converged study's choices, copied by hand from results/hippocampus_study_converged/records/
# (choices.json and README.md; scratch: the old arms' lr 5e-3, which beat the search's 2e-2 over the
# paired arms), not from recipes.py: a typo in the table must fail here.
MAE = {"lr": 3e-3, "warmup_steps": 1000, "weight_decay": 0.01, "layer_decay": 0.75,
       "freeze_encoder_steps": 500, "lr_schedule": "constant"}  # fmt: skip
SCRATCH = {"lr": 5e-3, "warmup_steps": 1000, "weight_decay": 0.01, "layer_decay": 1.0,
           "freeze_encoder_steps": 0, "lr_schedule": "constant"}  # fmt: skip


def settings(config: FinetuneConfig) -> dict:
    return {key: getattr(config, key) for key in MAE}


def test_the_recipe_follows_init_and_names_itself():
    """Catches the preset picked the wrong way round (tried: ``"scratch" if init else "mae"``), a wrong
    value in the table (tried: MAE layer decay 0.8), the plateau maximum swapped between recipes
    (tried: mae 28,000) and an AdamW recipe given to SGD (tried: the ``optimizer != "adamw"`` branch
    removed: SGD at lr 3e-3 with layer decay)."""
    mae = FinetuneConfig(data="d", out="o", init="encoder.safetensors", until_plateau=True)
    assert mae.recipe == "mae" and settings(mae) == MAE and mae.steps == 8000
    scratch = FinetuneConfig(data="d", out="o", until_plateau=True)
    assert scratch.recipe == "scratch" and settings(scratch) == SCRATCH and scratch.steps == 28000
    assert "recipe mae" in mae.recipe_note and "results/hippocampus_study_converged" in mae.recipe_note
    # An explicit preset wins over what init implies.
    assert settings(FinetuneConfig(data="d", out="o", recipe="mae", until_plateau=True)) == MAE
    with pytest.raises(ValueError, match="recipe must be one of"):
        FinetuneConfig(data="d", out="o", recipe="fast")
    # SGD was not tuned: it keeps its own defaults (nnU-Net's lr 1e-2, poly), and refuses AdamW recipes.
    sgd = FinetuneConfig(data="d", out="o", init="e", optimizer="sgd")
    assert (sgd.recipe, sgd.lr, sgd.lr_schedule, sgd.layer_decay) == ("none", None, "decay", 1.0)
    with pytest.raises(ValueError, match="tuned for AdamW"):
        FinetuneConfig(data="d", out="o", optimizer="sgd", recipe="mae")


def test_options_the_run_sets_win_over_the_recipe():
    """Catches the recipe overwriting what the run set (tried: ``setattr`` without the ``is None``
    check: lr back to 3e-3, layer decay back to 0.75), and ``none`` filling values (tried: the
    ``none`` row with lr 3e-3): it keeps the optimizer's own defaults (AdamW lr 1e-3, cosine)."""
    config = FinetuneConfig(data="d", out="o", init="e", until_plateau=True, lr=1e-2, layer_decay=1.0)
    assert settings(config) == {**MAE, "lr": 1e-2, "layer_decay": 1.0}
    assert "set by the run instead: lr (recipe: 0.003), layer_decay (recipe: 0.75)" in config.recipe_note
    plain = FinetuneConfig(data="d", out="o", init="e", recipe="none")
    assert (plain.lr, plain.warmup_steps, plain.layer_decay, plain.freeze_encoder_steps) == (
        None,
        None,
        1.0,
        0,
    )
    assert plain.lr_schedule == "decay" and plain.steps == 300
    model = _tiny_segmenter()
    assert build_optimizer(plain, model)[1] == 1e-3


def test_scaling_to_the_batch_and_to_a_short_fixed_budget(monkeypatch):
    """Hand-worked: batch 8 is 4x the study's 2, so lr 3e-3 * sqrt(4) = 6e-3; batch 2 with 2
    accumulation steps on 2 ranks (WORLD_SIZE) is 8 too. A fixed 300 steps (< 4 x 1,000) gets warmup
    300 // 4 = 75 and the encoder frozen 500 * 75 // 1000 = 37 steps, 3,000 steps a warmup of 750;
    8,000 steps keep the study's 1,000 / 500, and so does a plateau run, whose steps are only a maximum.
    A fixed budget decays its lr; a plateau run keeps the study's constant lr. Catches lr scaled
    linearly (tried: 1.2e-2), the ranks left out of the batch (tried: without WORLD_SIZE: 4.24e-3) and
    a plateau run's maximum taken as its budget (tried: the ``not until_plateau`` check removed: warmup
    500, and a decaying lr for a plateau run)."""
    assert FinetuneConfig(data="d", out="o", init="e", batch_size=8).lr == pytest.approx(6e-3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    spread = FinetuneConfig(data="d", out="o", init="e", batch_size=2, accumulate_steps=2)
    assert spread.lr == pytest.approx(6e-3)
    monkeypatch.delenv("WORLD_SIZE")
    short = FinetuneConfig(data="d", out="o", init="e", steps=300)
    assert (short.warmup_steps, short.freeze_encoder_steps, short.lr_schedule) == (75, 37, "decay")
    assert short.lr == pytest.approx(3e-3)  # batch 2: the study's own
    assert FinetuneConfig(data="d", out="o", init="e", steps=3000).warmup_steps == 750
    full = FinetuneConfig(data="d", out="o", init="e", steps=8000)
    assert (full.warmup_steps, full.freeze_encoder_steps) == (1000, 500)
    capped = FinetuneConfig(data="d", out="o", init="e", steps=2000, until_plateau=True)  # a maximum only
    assert (capped.warmup_steps, capped.freeze_encoder_steps, capped.lr_schedule) == (1000, 500, "constant")


def test_the_command_line_gets_the_recipe_and_a_copy_resolves_to_itself():
    """``maeformer finetune --init E`` with nothing else gets the MAE recipe (options left unset are
    None, not argparse defaults that would count as set); a config rebuilt from its own fields (as a
    resumed run's comparison does) is unchanged. Catches an option default that shadows the recipe
    (tried: ``layer_decay: float = 1.0`` in FinetuneConfig: the CLI run gets no layer decay)."""
    import dataclasses

    args = build_parser().parse_args(
        ["finetune", "--data", "d", "--out", "o", "--init", "e", "--until-plateau"]
    )
    config = dataclass_from_args(FinetuneConfig, args)
    assert settings(config) == MAE and config.steps == 8000
    assert dataclasses.asdict(dataclasses.replace(config)) == dataclasses.asdict(config)


def test_with_init_the_model_settings_come_from_the_encoder_file(tmp_path):
    """A 3-stage encoder (the study's) needs no model options: the segmenter gets 3 stages, the
    encoder's embedding and the data's channels and classes; an explicit ``model`` keeps the old
    meaning (its config). Catches the encoder file ignored (tried: ``get_config("small")`` always:
    4 stages, and the encoder's weights would not fit)."""
    overrides = {**encoder_overrides("small", 3), "embed_dim": 16, "num_heads": (1, 2, 2)}
    path = save_encoder(tmp_path / "encoder.safetensors", NNFormerEncoder(get_config("small", **overrides)))
    config = FinetuneConfig(data="d", out="o", init=str(path))
    built, note = segmenter_config(config, {"in_channels": 2, "num_classes": 4})
    assert (built.num_stages, built.embed_dim, built.in_channels, built.num_classes) == (3, 16, 2, 4)
    assert "from the encoder file" in note
    named, _ = segmenter_config(FinetuneConfig(data="d", out="o", init=str(path), model="small"), {})
    assert named.num_stages == 4 and named.embed_dim == 32


def test_until_plateau_stops_the_run_and_tensorboard_logs_it(phantom_cache, tmp_path):
    """Patience 2, min delta 1.0 (no Dice gain can count), min steps 3, validation every step, at most 8
    steps: the rule first holds at step 3 (three validations, two in the window), so the run ends
    there, keeps its best model and is scored on test, with a picture per test case. Its TensorBoard
    events hold the same validation Dice and one loss per step. Catches ``until_plateau`` ignored
    (tried: the ``PlateauRule`` line removed: 8 steps), the validation Dice not logged (tried:
    ``board.scalars`` for val_dice removed) and the test pictures not asked for (tried: no
    ``pictures=`` in ``finetune``'s ``evaluate_saved`` call)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny = {"embed_dim": 8, "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)}
    result = finetune(FinetuneConfig(
        data=str(phantom_cache), out=str(tmp_path / "run"), steps=8, until_plateau=True, plateau_patience=2,
        plateau_min_delta=1.0, plateau_min_steps=3, val_every=1, checkpoint_every=4, batch_size=2,
        num_workers=0, progress=False, max_val_cases=1, labeled=2, model_overrides=tiny, tensorboard=True,
    ))  # fmt: skip
    assert [step for step, _ in result.curve] == [1, 2, 3]
    assert result.test_dice is not None and math.isfinite(result.test_dice["mean"])
    pictures = sorted(p.stem for p in (tmp_path / "run" / "test_pictures").glob("*.png"))
    assert pictures == sorted(result.splits["test"])  # one picture per scored test case
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    logged = events.Scalars("val_dice")  # float32 in the event file: equal to 1e-6
    assert [e.step for e in logged] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([dice for _, dice in result.curve], abs=1e-6)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


def _tiny_segmenter():
    from maeformer_fast.models.nnformer import NNFormer

    return NNFormer(get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2)))
