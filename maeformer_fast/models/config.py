"""nnFormer configurations: the three published ones and a small CPU-friendly one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..ops.window_groups import Triple


@dataclass(frozen=True)
class NNFormerConfig:
    """Hyper-parameters of an nnFormer.

    ``window_sizes`` holds one (z, y, x) window per stage; the decoder stage at a resolution reuses the
    encoder's window and heads there. ``patch_size`` is the embedding stride, so the total stride of
    the encoder (and the MAE mask unit) is ``patch_size * 2 ** (len(depths) - 1)`` per axis.
    """

    name: str = "small"
    in_channels: int = 1
    num_classes: int = 3
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    patch_size: Triple = (2, 2, 2)
    window_sizes: tuple[Triple, ...] = ((4, 4, 4), (4, 4, 4), (4, 4, 4), (4, 4, 4))
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    deep_supervision: bool = True
    official_bias_index: bool = False
    attention_backend: str = "auto"
    conv_backend: str = "auto"
    crop_size: Triple = (32, 48, 32)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        stages = len(self.depths)
        if not (len(self.num_heads) == len(self.window_sizes) == stages):
            raise ValueError("depths, num_heads and window_sizes need one entry per stage")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i}: dim {self.embed_dim * 2**i} is not divisible by {heads} heads")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def total_stride(self) -> Triple:
        """Voxels per token at the last stage, per axis: the MAE mask unit."""
        factor = 2 ** (self.num_stages - 1)
        return tuple(p * factor for p in self.patch_size)  # type: ignore[return-value]

    @property
    def embedding_strides(self) -> tuple[Triple, Triple]:
        """Strides of the two strided embedding convs; their product is the patch size.

        The official code halves the patch first (ACDC keeps the depth stride 1 where the patch is 1).
        """
        first = tuple(max(p // 2, 1) for p in self.patch_size)
        second = tuple(p // f for p, f in zip(self.patch_size, first))
        return first, second  # type: ignore[return-value]

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NNFormerConfig:
        tuples = {"depths", "num_heads", "patch_size", "crop_size"}
        fixed = {k: tuple(v) if k in tuples else v for k, v in values.items()}
        fixed["window_sizes"] = tuple(tuple(w) for w in values["window_sizes"])
        return cls(**fixed)


def nnformer_synapse(**overrides) -> NNFormerConfig:
    """Synapse multi-organ CT: crop 64x128x128, ~150 M parameters."""
    values = dict(
        name="synapse",
        in_channels=1,
        num_classes=14,
        embed_dim=192,
        num_heads=(6, 12, 24, 48),
        patch_size=(2, 4, 4),
        window_sizes=((4, 4, 4), (4, 4, 4), (8, 8, 8), (4, 4, 4)),
        crop_size=(64, 128, 128),
    )
    return NNFormerConfig(**{**values, **overrides})


def nnformer_acdc(**overrides) -> NNFormerConfig:
    """ACDC cardiac MRI: crop 14x160x160, ~37 M parameters."""
    values = dict(
        name="acdc",
        in_channels=1,
        num_classes=4,
        embed_dim=96,
        num_heads=(3, 6, 12, 24),
        patch_size=(1, 4, 4),
        window_sizes=((3, 5, 5), (3, 5, 5), (7, 10, 10), (3, 5, 5)),
        crop_size=(14, 160, 160),
        deep_supervision=False,
    )
    return NNFormerConfig(**{**values, **overrides})


def nnformer_tumor(**overrides) -> NNFormerConfig:
    """BraTS brain tumour MRI (4 modalities): crop 128^3, ~38 M parameters."""
    values = dict(
        name="tumor",
        in_channels=4,
        num_classes=4,
        embed_dim=96,
        num_heads=(3, 6, 12, 24),
        patch_size=(4, 4, 4),
        window_sizes=((4, 4, 4), (4, 4, 4), (8, 8, 8), (4, 4, 4)),
        crop_size=(128, 128, 128),
        deep_supervision=False,
    )
    return NNFormerConfig(**{**values, **overrides})


def nnformer_small(**overrides) -> NNFormerConfig:
    """CPU-friendly config for tests, the phantoms and the hippocampus data (crop 32x48x32).

    Patch 2 gives a total stride of 16 voxels, i.e. 8x8x8-token mask units at the first stage,
    the unit size where block-form sparse convolutions pay off (brief, section 3).
    """
    return NNFormerConfig(**overrides)


MODEL_CONFIGS: dict[str, Callable[..., NNFormerConfig]] = {
    "small": nnformer_small,
    "synapse": nnformer_synapse,
    "acdc": nnformer_acdc,
    "tumor": nnformer_tumor,
}


def get_config(name: str, **overrides) -> NNFormerConfig:
    """Build a named config; unknown names get a clear error listing the known ones."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[name](**overrides)


def padded_size(size: Triple, multiple: Triple) -> Triple:
    """Smallest size >= ``size`` that is a multiple of ``multiple`` per axis."""
    return tuple(math.ceil(s / m) * m for s, m in zip(size, multiple))  # type: ignore[return-value]
