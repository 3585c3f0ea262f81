"""Augmentation applied on the training device to whole batches (torch), from a BatchPlan's params."""

from __future__ import annotations

import torch


def apply_flips(
    image: torch.Tensor, label: torch.Tensor | None, flips: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip sample b of image (B, C, Z, Y, X) and label (B, Z, Y, X) along the axes where flips[b]
    (B, 3) bool (CPU) is True."""
    if not bool(flips.any()):
        return image, label
    image = image.clone()
    label = None if label is None else label.clone()
    for b, f in enumerate(flips.tolist()):
        axes = [a for a in range(3) if f[a]]
        if axes:
            image[b] = image[b].flip([1 + a for a in axes])
            if label is not None:
                label[b] = label[b].flip(axes)
    return image, label


def apply_intensity(image: torch.Tensor, intensity: torch.Tensor, noise_seeds: torch.Tensor) -> torch.Tensor:
    """Gaussian noise, brightness, contrast, gamma (nnU-Net's order) on image (B, C, Z, Y, X).

    ``intensity``: (B, 4) (brightness, contrast, gamma, noise std), identity (1, 1, 1, 0) where off;
    ``noise_seeds``: (B,) int64 seeds of per-sample generators on the image's device, so the noise of a
    sample depends on its seed only (the same on resume). Samples with identity params are unchanged.
    """
    params = intensity.to(torch.float32)
    if image.is_cuda:  # from pinned memory the copy queues behind the GPU's work instead of waiting for it
        params = params.pin_memory()
    params = params.to(image.device, non_blocking=True)
    x = apply_noise(image, intensity[:, 3], noise_seeds)
    shape = (-1,) + (1,) * (image.dim() - 1)
    x = x * params[:, 0].view(shape)
    # Which transforms any sample gets is read on the host copy: no device sync.
    any_contrast, any_gamma = (bool((intensity[:, k] != 1).any()) for k in (1, 2))
    return apply_contrast_gamma(x, params[:, 1], params[:, 2], any_contrast, any_gamma)


def apply_noise(image: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Add N(0, std[b]^2) noise to samples with std > 0; the noise comes from a generator seeded by
    seeds[b] on the image's device. ``std``, ``seeds``: (B,) CPU tensors."""
    if not bool((std > 0).any()):
        return image
    out = image.clone()
    for b in torch.nonzero(std > 0).flatten().tolist():
        gen = torch.Generator(device=image.device).manual_seed(int(seeds[b]))
        out[b] += float(std[b]) * torch.randn(
            image.shape[1:], generator=gen, device=image.device, dtype=image.dtype
        )
    return out


def apply_contrast_gamma(
    x: torch.Tensor, contrast: torch.Tensor, gamma: torch.Tensor, any_contrast: bool, any_gamma: bool
) -> torch.Tensor:
    """Contrast around the per-channel mean (clamped to the old range) and gamma on the per-channel
    [min, max]-rescaled intensities with mean and std restored, on x (B, C, Z, Y, X). contrast, gamma:
    (B,) on x's device; ``any_contrast`` / ``any_gamma``: whether some contrast factor / gamma differs
    from 1 (known on the host, so no device read; the batch statistics are skipped otherwise)."""
    dims = (2, 3, 4)
    shape = (-1, 1, 1, 1, 1)
    if any_contrast:
        c = contrast.view(shape)
        mean = x.mean(dim=dims, keepdim=True)
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        x = torch.where(c != 1, torch.minimum(torch.maximum((x - mean) * c + mean, lo), hi), x)
    g = gamma.view(shape)
    if any_gamma:
        mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        span = (hi - lo).clamp_min(1e-7)
        y = ((x - lo) / span).clamp_min(0) ** g * span + lo
        # Restore the first two moments so gamma changes the shape of the histogram, not its scale.
        y = (y - y.mean(dim=dims, keepdim=True)) / y.std(dim=dims, keepdim=True).clamp_min(1e-7) * std + mean
        x = torch.where(g != 1, y, x)
    return x
