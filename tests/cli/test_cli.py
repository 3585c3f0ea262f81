"""The command line's success paths, at tiny scale: what each command reports and writes.

(``maeformer predict`` is run end to end in tests/inference/test_evaluation.py, ``preprocess`` and
``make-phantoms`` in tests/data/test_preprocess.py, ``bench`` in tests/bench/test_steps.py.)
"""

from __future__ import annotations

import csv
import json
import re
import sys

import pytest
import torch

from maeformer_fast.cli.main import main
from maeformer_fast.weights import load_weights

QUIET = ["--num-workers", "0", "--no-progress"]


def test_info_reports_this_environment(capsys):
    """Catches a report of other versions or threads (tried: ``torch.__version__`` -> ``"unknown"``)."""
    assert main(["info"]) == 0
    # "key  value" rows, keys padded to one width (some keys hold single spaces)
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in capsys.readouterr().out.splitlines()]
    report = dict(rows)
    assert report["torch"] == torch.__version__
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["cpu threads"] == str(torch.get_num_threads())


def test_finetune_command_with_sgd_layer_decay_and_labeled_fraction(phantom_cache, tmp_path):
    """The options reach the run: the optimizer checkpointed at step 2 of 4 is Nesterov SGD at lr
    1e-2 times the poly factor 0.5 ** 0.9, times one factor per encoder depth (1 for the decoder,
    0.5 ** 1 for the last stage ... 0.5 ** 5 for the embedding, worked out by hand), and half the
    training pool is used. Catches ``--layer-decay`` ignored (tried: no scales
    in ``build_optimizer``), ``--labeled-fraction`` ignored (tried: not passed to ``make_splits``)
    and SGD built without momentum (tried)."""
    out = tmp_path / "ft"
    argv = ["finetune", "--data", str(phantom_cache), "--out", str(out), "--steps", "4", "--optimizer", "sgd",
            "--layer-decay", "0.5", "--labeled-fraction", "0.5", "--val-every", "4", "--max-val-cases", "1",
            "--no-evaluate-test", "--checkpoint-every", "2", *QUIET]  # fmt: skip
    assert main(argv) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["pool"]) == 6 and len(splits["train"]) == 3  # 10 labeled: 2 test, 2 validation
    state = torch.load(out / "checkpoints" / "step-0000002" / "state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert all(g["momentum"] == 0.99 and g["nesterov"] for g in groups)
    lrs = sorted({g["lr"] for g in groups})  # with and without decay; at step 2 of 4: poly 0.5 ** 0.9
    assert lrs == pytest.approx([1e-2 * 0.5**0.9 * 0.5**k for k in range(5, -1, -1)], rel=1e-6)
    assert (out / "model.safetensors").is_file() and load_weights(out / "last.safetensors")[0]


def test_study_command_with_two_arms(phantom_cache, tmp_path, capsys):
    """Only the arms asked for run, each with its step count, and the table lists them. Catches
    ``--arms`` ignored (tried: ``parse_arms`` returning every arm: the MAE arm then pretrains)."""
    out = tmp_path / "study"
    argv = ["study", "--data", str(phantom_cache), "--out", str(out), "--labeled", "2", "--seeds", "1",
            "--arms", "scratch,scratch_matched", "--pretrain-steps", "1", "--finetune-steps", "1",
            "--val-every", "1", "--max-val-cases", "1", *QUIET]  # fmt: skip
    assert main(argv) == 0
    assert "study finished" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["arm"], r["steps"], r["labeled"]) for r in rows] == [
        ("scratch", "1", "2"),
        ("scratch_matched", "2", "2"),
    ]
    assert not (out / "pretrain").exists()  # no MAE arm: nothing pretrained


def test_demo_with_tiny_step_counts(tmp_path, capsys):
    """The whole demo at one step each: every test case predicted in its source geometry and scored.
    Catches a demo that scores fewer cases than its test split (tried: predicting only the first)."""
    assert main(["demo", "--out", str(tmp_path), "--pretrain-steps", "1", "--finetune-steps", "1"]) == 0
    printed = capsys.readouterr().out
    test_cases = json.loads((tmp_path / "finetune" / "splits.json").read_text())["test"]
    assert sorted(p.name for p in (tmp_path / "predictions").glob("*.nii.gz")) == sorted(
        f"{case}.nii.gz" for case in test_cases
    )
    scores = json.loads((tmp_path / "predictions" / "scores.json").read_text())
    assert sorted(scores["cases"]) == sorted(test_cases)
    assert "masked-unit loss" in printed and "class" in printed
