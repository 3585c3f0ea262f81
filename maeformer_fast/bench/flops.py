"""Counted FLOPs of a training step (torch.utils.flop_counter), for MFU and matched-compute budgets."""

from __future__ import annotations

import torch

from ..models.config import get_config


def step_flops(
    model: str,
    overrides: dict,
    crop: tuple[int, int, int],
    batch: int,
    in_channels: int,
    num_classes: int,
    mask_ratio: float | None,
    encoder: str = "sparse",
) -> int:
    """Counted FLOPs (``torch.utils.flop_counter``: matmuls, convolutions, attention) of one training
    step's forward and backward on the CPU: the MAE step with ``encoder`` "sparse" (visible tokens only)
    or "dense" (SimMIM-style) when ``mask_ratio`` is given, else a fine-tuning step (dense encoder,
    segmentation decoder, deep-supervision loss). Optimizer updates and elementwise work are not
    counted; they are a small share and alike in every kind of step. Attention is counted as the CPU
    computes it, padding included: the dense steps' windows cut from the grid count padded and masked
    pairs (a few percent more than the grouped windows count for the small config), the sparse
    step's power-of-two buckets their padding; a study counts every step kind one way throughout.

    The Triton kernels (chosen by the backends in ``overrides``, or by "auto" where a model counts on
    CUDA) are custom ops that FlopCounterMode cannot look into; their registered FLOP formulas count
    what the CPU path's matmuls and convolutions count (``ops.window_attention.attention_flops``,
    ``ops.sparse_conv.sparse_conv_flops``), so a sparse step counts alike on either backend. The
    counter copies torch's formula registry when it is made: after the model imports below, which
    register those formulas. Not counted on the CPU: ``scaled_dot_product_attention`` (torch 2.13 has
    no formula for its CPU kernels), i.e. the MAE decoder's attention over mask units, a small share."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..models.nnformer import NNFormer
    from ..ops.masking import random_unit_mask
    from ..train.losses import deep_supervision_loss
    from ..train.pretrain import PretrainConfig, build_mae

    torch.manual_seed(0)
    images = torch.randn(batch, in_channels, *crop)
    counter = FlopCounterMode(display=False)
    if mask_ratio is not None:
        mae = build_mae(
            PretrainConfig(
                data="",
                out="",
                model=model,
                mask_ratio=mask_ratio,
                encoder=encoder,
                model_overrides={**overrides, "in_channels": in_channels},
            )
        )
        ids = random_unit_mask(batch, mae.encoder.unit_grid(crop), mask_ratio)
        with counter:
            mae(images, ids)[0].backward()
    else:
        net = NNFormer(get_config(model, **overrides, in_channels=in_channels, num_classes=num_classes))
        labels = torch.randint(0, num_classes, (batch, *crop))
        with counter:
            deep_supervision_loss(net(images), labels).backward()
    return int(counter.get_total_flops())
