"""Saving and loading a pretrained nnFormer encoder as a backbone (safetensors + config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..ops.window_groups import official_to_correct_rows
from ..weights import load_weights, save_weights
from .config import NNFormerConfig
from .nnformer import NNFormer, NNFormerEncoder

ENCODER_FORMAT = "maeformer-encoder-v1"
SEGMENTER_FORMAT = "maeformer-segmenter-v1"


def save_encoder(path: str | Path, encoder: NNFormerEncoder, info: dict[str, Any] | None = None) -> Path:
    """Write encoder weights with their model config (and optional run info) in the file's metadata."""
    path = Path(path)
    metadata = {"format": ENCODER_FORMAT, "model_config": encoder.config.to_dict(), "info": info or {}}
    save_weights(path, encoder.state_dict(), metadata)
    return path


def read_encoder_file(path: str | Path) -> tuple[dict, NNFormerConfig, dict[str, Any]]:
    """(state dict, model config, run info) of an encoder file, or of the encoder part of a
    segmentation model file (``save_segmenter``, ``maeformer import-official``); clear errors for
    other files."""
    tensors, metadata = load_weights(Path(path))
    if metadata.get("format") == SEGMENTER_FORMAT:
        tensors = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    elif metadata.get("format") != ENCODER_FORMAT:
        raise ValueError(
            f"{path}: not a maeformer encoder or model file (metadata format {metadata.get('format')!r})"
        )
    return tensors, NNFormerConfig.from_dict(metadata["model_config"]), metadata.get("info", {})


def load_encoder(path: str | Path, **config_overrides: Any) -> NNFormerEncoder:
    """The pretrained nnFormer encoder of ``path``; ``encoder(x)`` returns per-stage feature maps.

    Example (as a backbone under another decoder)::

        encoder = load_encoder("runs/pretrain/encoder.safetensors")
        features = encoder(volume)  # [(B, E * 2**i, Z / s_i, Y / s_i, X / s_i) for each stage i]
    """
    tensors, config, _ = read_encoder_file(path)
    encoder = NNFormerEncoder(NNFormerConfig.from_dict({**config.to_dict(), **config_overrides}))
    load_state_exact(encoder, tensors, path, allowed_missing=())
    return encoder


def state_mismatch(
    expected: dict[str, torch.Size], tensors: dict, allowed_missing: tuple[str, ...] = ()
) -> str:
    """What keeps ``tensors`` from filling ``expected`` (key -> shape): the missing keys (but those
    under ``allowed_missing`` prefixes), the unexpected ones and the shape mismatches, at most 8 of
    each named; empty when they fit."""
    missing = [k for k in expected if k not in tensors and not k.startswith(allowed_missing)]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items()
        if k in tensors and tensors[k].shape != shape
    ]
    return "; ".join(
        f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    )


def load_state_exact(
    model: nn.Module, tensors: dict, source: str | Path, allowed_missing: tuple[str, ...]
) -> None:
    """Load ``tensors`` into ``model``; only keys under ``allowed_missing`` prefixes may be missing,
    nothing may be unexpected and shapes must match; otherwise a ValueError names the keys."""
    problems = state_mismatch({k: v.shape for k, v in model.state_dict().items()}, tensors, allowed_missing)
    if problems:
        raise ValueError(f"{source}: weights do not fit the model ({problems})")
    model.load_state_dict(tensors, strict=False)


def init_from_encoder(model: NNFormer, path: str | Path) -> dict[str, Any]:
    """Initialise a segmentation nnFormer's encoder from an encoder file (or a model file's encoder);
    the decoder/heads stay new. The file's encoder must have the model's shapes (a clear error
    otherwise); see :func:`load_encoder_tensors`."""
    tensors, config, info = read_encoder_file(path)
    load_encoder_tensors(model, tensors, config, path)
    return {"encoder_config": config.to_dict(), **info}


def load_encoder_tensors(model: NNFormer, tensors: dict, config: NNFormerConfig, source: str | Path) -> None:
    """Load an encoder state dict (keys without ``encoder.``) of an encoder built with ``config`` into
    ``model``'s encoder, exactly: every encoder tensor, nothing else, equal shapes (a ValueError naming
    the keys otherwise); the decoder/heads stay as they are.

    Bias tables of an encoder with ``official_bias_index`` (an imported official checkpoint) are
    converted to the model's correct layout when the model does not use the official index: each
    offset's row is copied from the official row it read, so the encoder computes the same.
    """
    if config.official_bias_index and not model.config.official_bias_index:
        tensors = {
            k: v[official_to_correct_rows(config.window_sizes[int(k.split(".")[1])])]
            if k.endswith("relative_position_bias_table")
            else v
            for k, v in tensors.items()
        }
    prefixed = {f"encoder.{k}": v for k, v in tensors.items()}
    load_state_exact(model, prefixed, source, allowed_missing=("decoder.", "heads."))


def save_segmenter(path: str | Path, model: NNFormer, plan: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write a fine-tuned nnFormer with its model config and the preprocessing plan predict needs."""
    path = Path(path)
    metadata = {
        "format": SEGMENTER_FORMAT,
        "model_config": model.config.to_dict(),
        "plan": plan,
        "info": info,
    }
    save_weights(path, model.state_dict(), metadata)
    return path


def load_segmenter(path: str | Path) -> tuple[NNFormer, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, preprocessing plan, run info) of a file written by :func:`save_segmenter`."""
    tensors, metadata = load_weights(Path(path))
    if metadata.get("format") != SEGMENTER_FORMAT:
        raise ValueError(
            f"{path}: not a maeformer segmentation model (metadata format {metadata.get('format')!r})"
        )
    model = NNFormer(NNFormerConfig.from_dict(metadata["model_config"]))
    load_state_exact(model, tensors, path, allowed_missing=())
    return model.eval(), metadata["plan"], metadata.get("info", {})
