"""maeformer_fast: visible-token-only MAE pretraining and few-label fine-tuning of nnFormer."""

__version__ = "0.1.0"
