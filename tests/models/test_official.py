"""Official nnFormer checkpoints: key mapping, logits against the official code's (fixtures), the
``import-official`` command, and refusing pickles that would run code.

The fixtures (tests/fixtures/official, README there) are state dicts, inputs and logits of the
official classes at reduced width, one per published layout.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from maeformer_fast.cli.main import main
from maeformer_fast.models import NNFormer, get_config
from maeformer_fast.models.official import load_official, official_key_map, read_official_checkpoint
from maeformer_fast.models.pretrained import init_from_encoder, load_encoder, load_segmenter

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official"
ARGUMENTS = json.loads((FIXTURES / "arguments.json").read_text())
NAMES = ["synapse", "acdc", "tumor"]


def overrides(name: str) -> dict:
    """Our config fields for a fixture's official constructor arguments (the reduced widths)."""
    args = ARGUMENTS[name]["args"]
    windows = tuple(tuple(w) if isinstance(w, list) else (w, w, w) for w in args["window_size"])
    fields = dict(embed_dim=args["embedding_dim"], in_channels=args["input_channels"],
                  num_classes=args["num_classes"], num_heads=tuple(args["num_heads"]),
                  window_sizes=windows, crop_size=tuple(args["crop_size"]))  # fmt: skip
    if name == "tumor":  # the official decoder's num_heads[::-1][:-1], in stage order
        fields["decoder_heads"] = tuple(args["num_heads"][1:])
    return fields


def official_state(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / f"{name}_state.safetensors")


@pytest.mark.parametrize("name", NAMES)
def test_official_state_dicts_map_one_to_one_with_equal_shapes(name):
    """Every official tensor has exactly one of ours, of its shape. Catches a wrong decoder order
    (tried: ``num_stages - 2 - k`` -> ``k`` in ``_official_key``: 60 decoder tensors of other
    shapes), decoder stages built with the encoder's heads (tried in ``make_blocks``: a bias table of
    another width) and the acdc first downsampling kernel (tried: 3x3x3, padding 1: its weight)."""
    state = official_state(name)
    model = NNFormer(get_config(name, **overrides(name)))
    key_map = official_key_map(model)
    assert sorted(key_map.values()) == sorted(state)
    ours = model.state_dict()
    assert [k for k, o in key_map.items() if ours[k].shape != state[o].shape] == []


@pytest.mark.parametrize("name", NAMES)
def test_imported_fixtures_reproduce_the_official_logits(name):
    """Logits equal the official network's: float64 to 1e-7 (measured 3e-8: the fixture's float32
    rounding), float32 to 1e-4 (measured up to 4.4e-5 vs the official float64). Catches, each tried:
    synapse's embedding strides swapped ((1,2,2) first: error 1.0), acdc's cyclic windows off (0.26)
    and the official bias index off (tumor: 0.064). (The odd-phase conv's back padding and the
    decoder's crop change nothing at official sizes: tests/models/test_nnformer.py catches them.)"""
    model = load_official(official_state(name), name, **overrides(name))
    io = load_file(FIXTURES / f"{name}_io.safetensors")
    x = io["input"].float()
    with torch.no_grad():
        torch.testing.assert_close(model.double()(x.double()).float(), io["logits_0"], atol=1e-7, rtol=0)
        torch.testing.assert_close(model.float()(x), io["logits_0"], atol=1e-4, rtol=0)
    if name == "synapse":  # deep supervision: full, 1/2, 1/4 resolution heads
        model = load_official(official_state(name), name, **overrides(name), drop_path_rate=0.0).train()
        with torch.no_grad():
            outputs = model.double()(x.double())
        for level, out in enumerate(outputs):
            torch.testing.assert_close(out.float(), io[f"logits_{level}"], atol=1e-7, rtol=0)


def test_unmatched_official_keys_are_named():
    """A missing, an unknown and a wrongly shaped tensor are each named in the error; the derived
    ``relative_position_index`` buffers of real checkpoints are accepted. Catches an import that
    ignores leftovers (tried: no 'unexpected' list), one that refuses the index buffers (tried) and
    a ``module.`` prefix kept (tried)."""
    state = {f"module.{k}": v for k, v in official_state("acdc").items()}
    state["module.model_down.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(48, 48).long()
    load_official(state, "acdc", **overrides("acdc"))
    del state["module.final.0.up.bias"]
    state["module.decoder.extra.weight"] = torch.zeros(1)
    state["module.model_down.norm1.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        load_official(state, "acdc", **overrides("acdc"))
    message = str(error.value)
    assert "missing: final.0.up.bias" in message and "unexpected: decoder.extra.weight" in message
    assert "shape mismatch: model_down.norm1.weight (3,) != (8,)" in message


class RunsCode:
    """Unpickling an instance calls ``os.system``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_needs_code_is_refused_and_nnunet_pickles_load(tmp_path):
    """A nnU-Net v1 style checkpoint (state dict, optimizer, numpy-scalar curves) loads; a pickle
    that calls a function is refused with the global named, and the function never runs. Catches
    ``weights_only=False`` (tried: the legacy loader unpickles the object, running the function,
    then fails) and numpy scalars not allow-listed (tried: the nnU-Net file is refused)."""
    state = OrderedDict((k, v) for k, v in official_state("tumor").items())
    nnunet = {"epoch": 999, "state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
              "amp_grad_scaler": None, "plot_stuff": ([0.5], [np.float64(0.4)], [], [np.float32(0.8)]),
              "best_stuff": (12, np.float64(0.1), np.float64(0.9), 0.9)}  # fmt: skip
    torch.save(nnunet, tmp_path / "model_final_checkpoint.model")
    loaded = read_official_checkpoint(tmp_path / "model_final_checkpoint.model")
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], v) for k, v in state.items())

    marker = tmp_path / "code-ran"
    with open(tmp_path / "hostile.model", "wb") as handle:
        pickle.dump({"state_dict": {}, "extra": RunsCode(marker)}, handle, protocol=2)
    with pytest.raises(ValueError, match=r"refused: it names posix\.system, which would run code"):
        read_official_checkpoint(tmp_path / "hostile.model")
    assert not marker.exists()


def test_import_official_then_predict_finetune_init_and_load_encoder(
    phantom_dataset, phantom_cache, tmp_path
):
    """``import-official`` writes a model that ``predict`` runs end to end, whose encoder
    ``load_encoder`` reads, and from which a default-config model (correct bias index) is initialised
    to the same encoder features (tables converted row by row). Catches a file predict cannot read
    (tried: saved with an empty plan), model files refused as encoders (tried: no segmenter branch
    in ``read_encoder_file``) and official tables loaded unconverted (tried: features off by 0.36)."""
    plan = json.loads((phantom_cache / "plan.json").read_text())
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({**plan, "num_classes": 2}))  # the fixture's two classes
    fields = {k: v for k, v in overrides("synapse").items() if k not in ("in_channels", "num_classes")}
    model_path = tmp_path / "synapse.safetensors"
    argv = ["import-official", str(FIXTURES / "synapse_state.safetensors"), "--model", "synapse", "--plan",
            str(plan_path), "--out", str(model_path), "--overrides", json.dumps(fields)]  # fmt: skip
    assert main(argv) == 0
    imported, _, info = load_segmenter(model_path)
    assert info["official_config"] == "synapse" and imported.config.official_bias_index

    images = phantom_dataset / "imagesTs"
    predictions = tmp_path / "pred"
    assert main(["predict", "--model", str(model_path), "--input", str(images), "--out", str(predictions),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert len(list(predictions.glob("*.nii.gz"))) == len(list(images.glob("*.nii.gz"))) > 0

    x = torch.randn(1, 1, 16, 32, 32)
    encoder = load_encoder(model_path).eval()
    fresh = NNFormer(get_config("synapse", **fields, num_classes=2)).eval()
    init_from_encoder(fresh, model_path)
    with torch.no_grad():
        expected = imported.encoder(x)
        for ours, theirs in zip(encoder(x), expected):
            torch.testing.assert_close(ours, theirs)
        for ours, theirs in zip(fresh.encoder(x), expected):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
