"""Official nnFormer checkpoints (282857341/nnFormer, nnU-Net v1 ``.model`` files) as ``NNFormer``s.

The three published configurations (``synapse``, ``acdc``, ``tumor``) build the official networks
tensor for tensor; an official state dict only needs its keys renamed. The imported model reads the
bias tables through the official index (``official_bias_index``) and, for ACDC, attends in the
official cyclic windows (``cyclic_windows``), so its forward equals the official network's.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from .config import NNFormerConfig, get_config
from .nnformer import NNFormer
from .pretrained import state_mismatch

PUBLISHED = ("synapse", "acdc", "tumor")

# What an nnU-Net v1 checkpoint holds besides tensors, containers, strings and numbers: numpy scalars
# (its loss and metric curves). Everything else needs code from the pickle and is refused.
_NUMPY_SCALAR = np._core.multiarray.scalar
SAFE_GLOBALS = [
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),  # the name numpy < 2 wrote
    np.dtype,
    *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)),
]

# Our key prefixes (regex) -> official ones; ``{dec}`` is the official decoder layer index.
_EMBED = re.compile(r"^encoder\.patch_embed\.layers\.([0-3])\.(conv|norm)\.")
_RENAMES = [
    (r"^encoder\.patch_embed\.norm\.", "model_down.patch_embed.norm."),
    (r"^encoder\.stages\.(\d+)\.norm\.", r"model_down.norm\1."),
    (r"^encoder\.stages\.(\d+)\.", r"model_down.layers.\1."),
    (r"^decoder\.(\d+)\.upsample\.", "decoder.layers.{dec}.Upsample."),
    (r"^decoder\.(\d+)\.", "decoder.layers.{dec}."),
    (r"^heads\.(\d+)\.", r"final.\1.up."),
]


def _official_key(key: str, num_stages: int) -> str:
    """The official name of our state-dict key ``key``."""
    embed = _EMBED.match(key)
    if embed:
        layer, kind = int(embed[1]), embed[2]
        # official: proj1 = conv1 (strided), norm1, conv2, norm2; proj2 = conv1 (strided), norm1, conv2
        key = f"model_down.patch_embed.proj{layer // 2 + 1}.{kind}{layer % 2 + 1}." + key[embed.end() :]
    else:
        for pattern, replacement in _RENAMES:
            match = re.match(pattern, key)
            if match:
                dec = num_stages - 2 - int(match[1]) if key.startswith("decoder.") else 0
                key = match.expand(replacement.format(dec=dec)) + key[match.end() :]
                break
    return key.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2.")


def official_key_map(model: NNFormer) -> dict[str, str]:
    """Our state-dict key -> the official key of the same tensor, for every tensor of ``model``."""
    return {key: _official_key(key, model.config.num_stages) for key in model.state_dict()}


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict`` of an official checkpoint (nnU-Net v1 ``.model`` pickle, or a plain state
    dict saved with ``torch.save`` or as ``.safetensors``), read without running code from the file.

    ``torch.load(weights_only=True)`` rebuilds only tensors, containers, strings, numbers and the
    numpy scalars of :data:`SAFE_GLOBALS`; a file that names any other global (a class or function
    the unpickler would call) is refused with a ValueError naming it, and nothing of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it names {named[1]}, which " if named else "it "
        raise ValueError(
            f"{path}: refused: {what}would run code from the file when unpickled; only tensors, "
            "containers, strings, numbers and numpy scalars are read (torch.load weights_only=True)"
        ) from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state_dict of tensors in this checkpoint")
    return state


def load_official(checkpoint: str | Path | dict[str, Tensor], name: str, **overrides: object) -> NNFormer:
    """An ``NNFormer`` holding an official checkpoint's weights; its forward equals the official one.

    Args:
        checkpoint: a ``.model`` file (see :func:`read_official_checkpoint`) or its state dict, with
            the official key names (a ``module.`` prefix from DataParallel is dropped).
        name: the published configuration the checkpoint was trained with: synapse, acdc or tumor.
        overrides: config fields that differ from the trainer's (e.g. ``num_classes`` for another
            dataset, ``in_channels``).

    Raises:
        ValueError: naming the keys that are missing, left over or of another shape.
    """
    if name not in PUBLISHED:
        raise ValueError(f"no official nnFormer {name!r}; choose one of {list(PUBLISHED)}")
    source = checkpoint if isinstance(checkpoint, dict) else read_official_checkpoint(checkpoint)
    label = "state dict" if isinstance(checkpoint, dict) else str(checkpoint)
    official = {k.removeprefix("module."): v for k, v in source.items()}
    config: NNFormerConfig = get_config(
        name, **{"official_bias_index": True, "cyclic_windows": name == "acdc", **overrides}
    )
    model = NNFormer(config)
    key_map = official_key_map(model)
    ours = model.state_dict()
    tensors = {k: v for k, v in official.items() if not k.endswith(".relative_position_index")}  # derived
    problems = state_mismatch({o: ours[k].shape for k, o in key_map.items()}, tensors)
    if problems:
        raise ValueError(f"{label}: not an official nnFormer-{name} state dict ({problems})")
    model.load_state_dict({k: official[o].float() for k, o in key_map.items()})
    return model.eval()
