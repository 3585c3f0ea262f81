"""nnFormer model, encoder and configurations."""

from .config import (
    MODEL_CONFIGS,
    NNFormerConfig,
    get_config,
    nnformer_acdc,
    nnformer_small,
    nnformer_synapse,
    nnformer_tumor,
)
from .nnformer import NNFormer, NNFormerEncoder

__all__ = [
    "MODEL_CONFIGS",
    "NNFormer",
    "NNFormerConfig",
    "NNFormerEncoder",
    "get_config",
    "nnformer_acdc",
    "nnformer_small",
    "nnformer_synapse",
    "nnformer_tumor",
]
