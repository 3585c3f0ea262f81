"""nnU-Net v2 integration: pretraining on nnU-Net data, few-label splits, nnFormer trainers."""
