"""maeformer_fast: visible-token-only MAE pretraining and few-label fine-tuning of nnFormer.

The public functions import their heavy modules on first use, so ``import maeformer_fast`` stays fast.
"""

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "pretrain": "maeformer_fast.train.pretrain",
    "PretrainConfig": "maeformer_fast.train.pretrain",
    "finetune": "maeformer_fast.train.finetune",
    "FinetuneConfig": "maeformer_fast.train.finetune",
    "predict": "maeformer_fast.inference.predict",
    "evaluate": "maeformer_fast.inference.predict",
    "load_encoder": "maeformer_fast.models.pretrained",
    "NNFormer": "maeformer_fast.models",
    "NNFormerEncoder": "maeformer_fast.models",
    "get_config": "maeformer_fast.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maeformer_fast' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
