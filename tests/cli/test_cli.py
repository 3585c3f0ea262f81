"""The command line's success paths, at tiny scale: what each command reports and writes; and its
failure paths: a user error exits 2 with one line on stderr that names the problem.

(``maeformer predict`` is run end to end in tests/inference/test_evaluation.py, ``preprocess`` and
``make-phantoms`` in tests/data/test_preprocess.py, ``bench`` in tests/bench/test_steps.py.)
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import re
import sys
from pathlib import Path

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


def test_model_overrides_as_json(capsys):
    """``--model-overrides`` reaches the config as the study's 3-stage encoder (nested lists become the
    config's tuples), an unset one keeps the empty default, and a JSON array is refused with a message.
    Catches the option dropped for dict fields (tried: the ``base is dict`` branch removed: argparse
    rejects the option) and an unset option passed as None (tried: no ``default_factory`` check:
    FinetuneConfig gets ``model_overrides=None``)."""
    from maeformer_fast.cli.args import dataclass_from_args
    from maeformer_fast.cli.main import build_parser
    from maeformer_fast.models.config import get_config
    from maeformer_fast.train.finetune import FinetuneConfig

    three = '{"depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_sizes": [[4, 4, 4], [4, 4, 4], [4, 4, 4]]}'
    parser = build_parser()
    config = dataclass_from_args(FinetuneConfig, parser.parse_args(
        ["finetune", "--data", "d", "--out", "o", "--model-overrides", three]))  # fmt: skip
    built = get_config("small", **config.model_overrides)
    assert built.depths == (2, 2, 2) and built.window_sizes == ((4, 4, 4),) * 3 and built.num_stages == 3
    plain = dataclass_from_args(FinetuneConfig, parser.parse_args(["finetune", "--data", "d", "--out", "o"]))
    assert plain.model_overrides == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--data", "d", "--out", "o", "--model-overrides", "[2, 2]"])
    assert "a JSON object ({...}) is needed, got: [2, 2]" in capsys.readouterr().err


def test_demo_with_tiny_step_counts(tmp_path, capsys):
    """The whole demo at one step each: every test case predicted in its source geometry, scored and
    pictured, and the sparse-vs-dense timing printed. Catches a demo that scores fewer cases than its
    test split (tried: predicting only the first) and the pictures left out (tried: ``png=False``)."""
    argv = [
        "demo",
        "--out",
        str(tmp_path),
        "--pretrain-steps",
        "1",
        "--finetune-steps",
        "1",
        "--speed-seconds",
        "0",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    test_cases = json.loads((tmp_path / "finetune" / "splits.json").read_text())["test"]
    assert sorted(p.name for p in (tmp_path / "predictions").glob("*.nii.gz")) == sorted(
        f"{case}.nii.gz" for case in test_cases
    )
    scores = json.loads((tmp_path / "predictions" / "scores.json").read_text())
    assert sorted(scores["cases"]) == sorted(test_cases)
    assert "masked-unit loss" in printed and "class" in printed
    assert re.search(
        r"visible tokens only: \d+ ms; with mask tokens \(dense\): \d+ ms: [\d.]+x faster", printed
    )
    assert sorted(p.stem for p in (tmp_path / "predictions" / "png").glob("*.png")) == sorted(test_cases)
    assert "test Dice" in printed.splitlines()[-2]  # the verdict on the 0.8 bar, before the pictures line


# ---------------------------------------------------------------------------------------------------
# Failure paths


def error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """What a failed ``command`` printed: exactly one stderr line, "maeformer COMMAND: error: ..."
    (returned without that prefix)."""
    err = capsys.readouterr().err
    prefix = f"maeformer {command}: error: "
    assert err.count("\n") == 1 and err.endswith("\n") and err.startswith(prefix), repr(err)
    return err[len(prefix) : -1]


def test_a_case_the_cache_lacks_is_one_line(phantom_cache, tmp_path, capsys, monkeypatch):
    """The library's unknown-case error (``data.cache.select_cases``, a KeyError) from a fine-tuning
    run whose training split names a case the cache lacks: exit 2 and the message itself, not its
    repr; with MAEFORMER_TRACEBACK=1 the KeyError itself. The CLI's own case lists come from the
    cache's plan, so the split is made to name one here (phantom_999 next to the real ones).
    Mutations seen failing: KeyError left out of ``main``'s except clause (the KeyError escaped);
    ``str(error)`` for it (the line read "\"cases not in the cache: ['phantom_999']\"")."""
    finetune_module = importlib.import_module("maeformer_fast.train.finetune")
    make_splits = finetune_module.make_splits

    def with_a_missing_case(*args, **kwargs):
        splits = make_splits(*args, **kwargs)
        return dataclasses.replace(splits, train=[*splits.train, "phantom_999"])

    monkeypatch.setattr(finetune_module, "make_splits", with_a_missing_case)
    argv = ["finetune", "--data", str(phantom_cache), "--steps", "1", *QUIET]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert error_line(capsys, "finetune") == "cases not in the cache: ['phantom_999']"
    monkeypatch.setenv("MAEFORMER_TRACEBACK", "1")
    with pytest.raises(KeyError, match="phantom_999"):
        main([*argv, "--out", str(tmp_path / "b")])


def test_a_bare_key_error_keeps_its_traceback(monkeypatch):
    """A KeyError of a bare key (a dict lookup nothing guarded: a bug, not a user error) is re-raised,
    not reduced to "error: 'plan'". Mutation seen failing: every KeyError taken for a user error
    (``named = isinstance(error, KeyError)``: main returned 2)."""
    cli = importlib.import_module("maeformer_fast.cli.main")  # not the ``main`` function of cli/__init__

    def unguarded_lookup(args: object) -> int:
        return {}["plan"]

    monkeypatch.setattr(cli, "cmd_evaluate", unguarded_lookup)
    with pytest.raises(KeyError, match="plan"):
        cli.main(["evaluate", "--pred", "p", "--ref", "r"])


def test_user_errors_are_one_line_naming_the_problem(phantom_cache, tmp_path, capsys):
    """An unknown model name (ValueError), a missing model file and a folder without volumes
    (FileNotFoundError), a missing dataset (a DatasetError of one problem): each exits 2 with one
    line that names what is wrong. Mutation seen failing: no DatasetError branch in ``main`` (its
    problem list joined as it is: "1 problem(s) in dataset ...: - .../no_data: dataset folder ...")."""
    no_model, no_data, empty = tmp_path / "none.safetensors", tmp_path / "no_data", tmp_path / "empty"
    empty.mkdir()
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["finetune", "--data", str(phantom_cache), "--model", "nope", *out, *QUIET],
         "unknown model config 'nope'; choose one of ['acdc', 'small', 'synapse', 'tumor']"),
        (["predict", "--model", str(no_model), "--input", str(empty), *out],
         f"{no_model}: no such weights file"),
        (["evaluate", "--pred", str(empty), "--ref", str(empty)], f"{empty}: no .nii or .nii.gz files found"),
        (["finetune", "--data", str(no_data), *out, *QUIET],
         f"1 problem(s) in dataset {no_data}: {no_data}: dataset folder does not exist"),
    ]  # fmt: skip
    for argv, want in cases:
        assert main(argv) == 2, argv
        assert error_line(capsys, argv[0]) == want


def test_a_dataset_with_many_problems_is_one_line(tmp_path: Path, capsys):
    """Five images without labels: one line with the count, the first three problems and how many
    more (``MAEFORMER_TRACEBACK=1`` lists them all). Mutation seen failing: every problem shown
    (``error.problems[:3]`` -> ``error.problems``: case_3 and case_4 named too)."""
    images = tmp_path / "data" / "imagesTr"
    images.mkdir(parents=True)
    for i in range(5):
        (images / f"case_{i}.nii.gz").write_bytes(b"")
    assert main(["preprocess", str(tmp_path / "data"), str(tmp_path / "cache")]) == 2
    problems = "; ".join(
        f"{images / f'case_{i}.nii.gz'}: image without label (no labelsTr file)" for i in range(3)
    )
    want = (
        f"5 problem(s) in dataset {tmp_path / 'data'}: {problems}; 2 more (MAEFORMER_TRACEBACK=1 lists all)"
    )
    assert error_line(capsys, "preprocess") == want


def test_a_multi_line_message_is_one_line(monkeypatch, capsys):
    """A user error whose message spans lines (as a library message may) is printed joined into one.
    Mutation seen failing: the join in ``main`` left out (two lines on stderr)."""
    cli = importlib.import_module("maeformer_fast.cli.main")

    def two_lines(args: object) -> int:
        raise ValueError("volume x.nii.gz is empty:\n  re-export it")

    monkeypatch.setattr(cli, "cmd_evaluate", two_lines)
    assert cli.main(["evaluate", "--pred", "p", "--ref", "r"]) == 2
    assert error_line(capsys, "evaluate") == "volume x.nii.gz is empty: re-export it"


def test_ctrl_c_outside_a_training_loop_exits_130_in_one_line(monkeypatch, capsys):
    """Ctrl-C while a command is not in a training loop (building the cache, scoring the test split):
    one line and exit 130, as inside the loop, not a traceback. Mutation seen failing: the
    ``except KeyboardInterrupt`` removed from ``main`` (the KeyboardInterrupt escapes)."""
    import importlib

    cli = importlib.import_module("maeformer_fast.cli.main")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_evaluate", interrupted)
    assert cli.main(["evaluate", "--pred", "p", "--ref", "r"]) == 130
    assert capsys.readouterr().err == "maeformer evaluate: interrupted (Ctrl-C)\n"
