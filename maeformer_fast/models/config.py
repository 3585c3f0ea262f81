"""nnFormer configurations: the three published ones and a small CPU-friendly one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..types import Triple

# (kernel, stride, padding) a downsampling may have along one axis (see NNFormerConfig).
DOWNSAMPLING_AXES = ((1, 1, 0), (3, 1, 1), (3, 2, 1), (3, 2, 0))


@dataclass(frozen=True)
class NNFormerConfig:
    """Hyper-parameters of an nnFormer.

    ``window_sizes`` holds one (z, y, x) window per stage; the decoder stage at a resolution reuses the
    encoder's window there, with ``decoder_heads`` heads (default: the encoder's). ``patch_size`` is
    the embedding stride, made by the two strided embedding convs ``embed_strides`` (default: half
    the patch first). Downsampling ``i`` (after stage ``i``) is a conv with ``down_kernels[i]``,
    ``down_strides[i]`` and ``down_paddings[i]`` (defaults 3, 2, 1 per axis); the total stride of the
    encoder (and the MAE mask unit) is the patch size times the product of the downsampling strides.

    Per axis a downsampling has kernel 1 (stride 1, padding 0) or kernel 3 with padding 1, or, with
    stride 2, padding 0: ACDC's official last downsampling in depth, whose taps sit on slices
    2i .. 2i+2. There the grid is zero-padded by one slice at the far end, so an odd length L keeps
    the official (L - 1) / 2 outputs and an even one gets L / 2, and the matching decoder upsampling
    has ``output_padding`` 1 (the official (3 -> 7) of ACDC's 14-slice crop).

    ``official_bias_index`` reads the relative position bias table through the official (aliasing)
    index; ``cyclic_windows`` reproduces ACDC's official blocks, which zero-pad the grid to a multiple
    of the window, roll it for shifted windows and attend without a mask (dense inputs only). Both
    are for official checkpoints (``models.official.load_official``).
    """

    name: str = "small"
    in_channels: int = 1
    num_classes: int = 3
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    patch_size: Triple = (2, 2, 2)
    window_sizes: tuple[Triple, ...] = ((4, 4, 4), (4, 4, 4), (4, 4, 4), (4, 4, 4))
    embed_strides: tuple[Triple, Triple] | None = None
    down_kernels: tuple[Triple, ...] | None = None
    down_strides: tuple[Triple, ...] | None = None
    down_paddings: tuple[Triple, ...] | None = None
    decoder_heads: tuple[int, ...] | None = None
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    deep_supervision: bool = True
    official_bias_index: bool = False
    cyclic_windows: bool = False
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
        if len(self.decoder_num_heads) != stages - 1:
            raise ValueError("decoder_heads needs one entry per decoder stage (stages - 1)")
        for i, heads in enumerate(self.decoder_num_heads):
            if self.stage_dim(i) % heads:
                raise ValueError(
                    f"decoder stage {i}: dim {self.stage_dim(i)} is not divisible by {heads} heads"
                )
        first, second = self.embedding_strides
        if tuple(a * b for a, b in zip(first, second)) != tuple(self.patch_size):
            raise ValueError(f"embed_strides {first} x {second} do not make the patch size {self.patch_size}")
        layers = zip(self.downsampling_kernels, self.downsampling_strides, self.downsampling_paddings)
        for i, layer in enumerate(layers):
            if len(layer[0]) != 3 or not all(axis in DOWNSAMPLING_AXES for axis in zip(*layer)):
                raise ValueError(
                    f"downsampling {i}: kernel, stride, padding {layer} not supported; per axis one of "
                    f"{DOWNSAMPLING_AXES}"
                )

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def total_stride(self) -> Triple:
        """Voxels per token at the last stage, per axis: the MAE mask unit."""
        return self.stage_stride(self.num_stages - 1)

    def stage_stride(self, stage: int) -> Triple:
        """Voxels per token at ``stage``, per axis (the patch times the downsampling strides before)."""
        stride = tuple(self.patch_size)
        for down in self.downsampling_strides[:stage]:
            stride = tuple(s * d for s, d in zip(stride, down))
        return stride  # type: ignore[return-value]

    @property
    def output_strides(self) -> tuple[Triple, ...]:
        """Input voxels per output voxel of each segmentation head, full resolution first: (1, 1, 1), then
        the downsampling strides multiplied up, one head per stage for up to three stages with deep
        supervision (the last stage has none), the full-resolution head alone without."""
        heads = min(3, self.num_stages - 1) if self.deep_supervision else 1
        return tuple(
            tuple(s // p for s, p in zip(self.stage_stride(i), self.patch_size))  # type: ignore[misc]
            for i in range(heads)
        )

    def output_sizes(self, size: Triple) -> list[Triple]:
        """The (Z, Y, X) of each head's output for an input of ``size``: ceil(size / output stride), the
        extent of the input at that head's resolution."""
        return [tuple(-(-n // s) for n, s in zip(size, stride)) for stride in self.output_strides]  # type: ignore[misc]

    @property
    def embedding_strides(self) -> tuple[Triple, Triple]:
        """Strides of the two strided embedding convs; their product is the patch size.

        Default: half the patch first (a patch of 1 keeps stride 1), the rest second.
        """
        if self.embed_strides is not None:
            return self.embed_strides
        first = tuple(max(p // 2, 1) for p in self.patch_size)
        second = tuple(p // f for p, f in zip(self.patch_size, first))
        return first, second  # type: ignore[return-value]

    @property
    def downsampling_kernels(self) -> tuple[Triple, ...]:
        return self.down_kernels or ((3, 3, 3),) * (self.num_stages - 1)

    @property
    def downsampling_strides(self) -> tuple[Triple, ...]:
        return self.down_strides or ((2, 2, 2),) * (self.num_stages - 1)

    @property
    def downsampling_paddings(self) -> tuple[Triple, ...]:
        return self.down_paddings or tuple(
            tuple(k // 2 for k in kernel) for kernel in self.downsampling_kernels
        )

    @property
    def decoder_num_heads(self) -> tuple[int, ...]:
        """Heads of the decoder stage at each resolution, stage 0 first."""
        return self.decoder_heads or tuple(self.num_heads[:-1])

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NNFormerConfig:
        return cls(**as_tuples(values))


def as_tuples(values: dict) -> dict:
    """Config fields with JSON's lists (a saved config, a study's overrides) turned into the tuples the
    model hashes and compares, e.g. ``window_sizes`` [[4, 4, 4]] -> ((4, 4, 4),)."""
    tuples = {"depths", "num_heads", "patch_size", "crop_size", "decoder_heads"}
    nested = {"window_sizes", "embed_strides", "down_kernels", "down_strides", "down_paddings"}
    return {
        k: None if v is None else tuple(v) if k in tuples else tuple(map(tuple, v)) if k in nested else v
        for k, v in values.items()
    }


def nnformer_synapse(**overrides) -> NNFormerConfig:
    """Synapse multi-organ CT: crop 64x128x128, 150,054,210 parameters (the official network)."""
    values = dict(
        name="synapse",
        in_channels=1,
        num_classes=14,
        embed_dim=192,
        num_heads=(6, 12, 24, 48),
        patch_size=(2, 4, 4),
        embed_strides=((2, 2, 2), (1, 2, 2)),
        window_sizes=((4, 4, 4), (4, 4, 4), (8, 8, 8), (4, 4, 4)),
        crop_size=(64, 128, 128),
    )
    return NNFormerConfig(**{**values, **overrides})


def nnformer_acdc(**overrides) -> NNFormerConfig:
    """ACDC cardiac MRI: crop 14x160x160, 37,160,200 parameters (the official network).

    The official trainer's ``down_stride`` keeps the depth at the first downsampling (kernel and
    stride (1, 2, 2)); its last downsampling has depth padding 0 (14 -> 14 -> 7 -> 3 slices at the
    crop) and the matching upsampling ``output_padding`` 1 in depth.
    """
    values = dict(
        name="acdc",
        in_channels=1,
        num_classes=4,
        embed_dim=96,
        num_heads=(3, 6, 12, 24),
        patch_size=(1, 4, 4),
        embed_strides=((1, 2, 2), (1, 2, 2)),
        down_kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
        down_strides=((1, 2, 2), (2, 2, 2), (2, 2, 2)),
        down_paddings=((0, 1, 1), (1, 1, 1), (0, 1, 1)),
        window_sizes=((3, 5, 5), (3, 5, 5), (7, 10, 10), (3, 5, 5)),
        crop_size=(14, 160, 160),
        deep_supervision=False,
    )
    return NNFormerConfig(**{**values, **overrides})


def nnformer_tumor(**overrides) -> NNFormerConfig:
    """BraTS brain tumour MRI (4 modalities): crop 128^3, 37,606,726 parameters (the official network).

    Its decoder stages have twice the heads of the encoder at the same resolution (the official
    ``num_heads[::-1][:-1]``).
    """
    values = dict(
        name="tumor",
        in_channels=4,
        num_classes=4,
        embed_dim=96,
        num_heads=(3, 6, 12, 24),
        decoder_heads=(6, 12, 24),
        patch_size=(4, 4, 4),
        embed_strides=((2, 2, 2), (2, 2, 2)),
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
    return MODEL_CONFIGS[name](**as_tuples(overrides))
